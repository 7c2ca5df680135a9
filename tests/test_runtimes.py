"""ditdeploy.runtimes on real ONNX Runtime / OpenVINO / torch (CPU): loading, manifest checks, per-call parity.

Tolerances: fp32 artifacts compute the same function as torch; only float summation order differs (fused kernels,
other GEMM blocking), so per-call rel-L2 is ~1e-7 here; 1e-5 leaves two orders of margin while a wrong graph or
wrong weights are >= 1e-2. OpenVINO with the bf16 hint rounds GEMM inputs to 8 mantissa bits (~2^-9 = 2e-3 per
operation): its rel-L2 is expected around 1e-3..3e-2, and must be clearly worse than f32.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import rt_artifacts

from ditdeploy.artifact.files import write_json_atomic
from ditdeploy.artifact.manifest import make_manifest
from ditdeploy.config.variants import DIGITS
from ditdeploy.errors import ArtifactError, DitDeployError, MissingDependencyError
from ditdeploy.proof import distances
from ditdeploy.runtimes import Decoder, Denoiser, Timed, load, load_decoder, resolve_backend
from ditdeploy.runtimes.onnxruntime import choose_providers
from ditdeploy.runtimes.openvino import compile_config

FP32_REL_L2 = 1e-5


@pytest.fixture(scope="session")
def px(tmp_path_factory):
    return rt_artifacts.pixel_artifacts(tmp_path_factory.getbasetemp() / "rt")


@pytest.fixture(scope="session")
def lt(tmp_path_factory):
    return rt_artifacts.latent_artifacts(tmp_path_factory.getbasetemp() / "rt")


def _inputs(cfg, n=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cfg.in_channels, cfg.input_size, cfg.input_size), dtype=np.float32)
    t = np.linspace(0, 999, n).round().astype(np.int64)
    y = np.arange(n, dtype=np.int64) % (cfg.num_classes + 1)  # includes the null class
    return x, t, y


def test_load_by_suffix_and_by_name(px):
    ort_den = load(px["onnx"])
    ov_onnx = load(px["onnx"], backend="openvino")
    ov_xml = load(px["xml"])
    ref = load(px["ckpt"])
    assert ort_den.name == "onnxruntime:CPUExecutionProvider:fp32"
    assert ov_onnx.name == ov_xml.name == "openvino:CPU:fp32"
    assert ref.name == "torch:cpu:fp32"
    for d in (ort_den, ov_onnx, ov_xml, ref):
        assert isinstance(d, Denoiser)
        assert d.config == DIGITS
        assert d.manifest["kind"] == "denoiser"
    assert ov_xml.manifest["format"] == "openvino" and ort_den.manifest["format"] == "onnx"


def test_backends_agree_with_torch_per_call(px):
    ref = load(px["ckpt"])
    x, t, y = _inputs(ref.config, n=6)
    want = ref(x, t, y)
    assert want.shape == (6, 2, 8, 8) and want.dtype == np.float32
    assert float(np.abs(want).mean()) > 0.05  # random weights give a non-trivial output
    for art, backend in ((px["onnx"], None), (px["onnx"], "openvino"), (px["xml"], None)):
        got = load(art, backend=backend)(x, t, y)
        assert got.shape == want.shape and got.dtype == np.float32
        assert distances.rel_l2(got, want) < FP32_REL_L2, (art.name, backend)
        assert distances.cosine(got, want) > 0.999999


def test_chunking_to_max_batch_gives_the_same_output(px):
    x, t, y = _inputs(DIGITS, n=7)
    for art in (px["onnx"], px["xml"]):
        whole = load(art)
        chunked = load(art, max_batch=3)
        assert chunked.max_batch == 3
        np.testing.assert_allclose(chunked(x, t, y), whole(x, t, y), rtol=1e-6, atol=1e-6)


def test_inputs_are_cast_and_checked(px):
    den = load(px["onnx"])
    x, t, y = _inputs(DIGITS, n=2)
    a = den(x.astype(np.float64), t.astype(np.int32), y.astype(np.int32))
    np.testing.assert_array_equal(a, den(x, t, y))
    np.testing.assert_array_equal(den(x, 500, y), den(x, np.array([500, 500]), y))  # scalar t broadcast
    with pytest.raises(DitDeployError, match=r"model takes \(N, 1, 8, 8\)"):
        den(np.zeros((2, 4, 8, 8), np.float32), t, y)
    with pytest.raises(DitDeployError, match="t and y must have shape"):
        den(x, t[:1], y)


def test_timed_wrapper_counts_and_forwards(px):
    den = load(px["onnx"])
    tm = Timed(den)
    x, t, y = _inputs(DIGITS, n=3)
    tm(x, t, y)
    tm(x[:1], t[:1], y[:1])
    assert (tm.calls, tm.rows) == (2, 4) and tm.seconds > 0
    assert tm.name == den.name and tm.config is den.config and tm.manifest is den.manifest


def _copy(art, tmp_path):
    """Copy an ONNX artifact and its manifest (+ external data) into tmp_path."""
    for p in art.parent.glob(art.name + "*"):
        shutil.copy(p, tmp_path / p.name)
    return tmp_path / art.name


def test_manifest_is_verified(px, tmp_path):
    p = _copy(px["onnx"], tmp_path)
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load(p)
    load(p, verify=False)  # the check can be skipped explicitly
    (tmp_path / (p.name + ".json")).unlink()
    with pytest.raises(ArtifactError, match="no manifest"):
        load(p)


def test_manifest_config_must_match_the_graph(px, tmp_path):
    p = _copy(px["onnx"], tmp_path)
    mp = tmp_path / (p.name + ".json")
    m = json.loads(mp.read_text())
    m["config"]["in_channels"] = 3
    mp.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="do not belong together"):
        load(p)
    m["kind"] = "decoder"
    mp.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="expected a denoiser"):
        load(p)


def test_backend_selection_errors(px, tmp_path):
    assert resolve_backend(px["onnx"]) == "onnxruntime"
    assert resolve_backend(px["onnx"], "ov") == "openvino"
    assert resolve_backend(px["xml"]) == "openvino"
    assert resolve_backend(px["ckpt"]) == "torch"
    assert resolve_backend(tmp_path / "m.pt") == resolve_backend(tmp_path / "m.pth") == "torch"
    with pytest.raises(DitDeployError, match="unknown backend 'tvm'"):
        load(px["onnx"], backend="tvm")
    with pytest.raises(DitDeployError, match="onnxruntime backend cannot read .xml"):
        load(px["xml"], backend="onnxruntime")
    with pytest.raises(DitDeployError, match="cannot tell the backend"):
        resolve_backend(tmp_path / "model.bin")
    with pytest.raises(ArtifactError, match="no such file"):
        load(tmp_path / "absent.onnx")


def test_missing_optional_runtime_is_one_line(px, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(MissingDependencyError) as e:
        load(px["xml"])
    assert str(e.value) == "the OpenVINO backend needs the 'openvino' package: pip install 'ditdeploy[openvino]'"


def test_ort_provider_choice():
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(None, avail) == avail
    assert choose_providers(None, ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == "CUDAExecutionProvider"
    assert choose_providers("cpu", avail) == ["CPUExecutionProvider"]
    assert choose_providers("cuda", avail) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(DitDeployError, match="CUDAExecutionProvider is not available here"):
        choose_providers("cuda", ["CPUExecutionProvider"])
    for blank in ("\r", " , ", ",\n"):  # a value that names nothing is an error, not a silent default
        with pytest.raises(DitDeployError, match="names no provider"):
            choose_providers(blank, avail)
    assert choose_providers(None) == ["CPUExecutionProvider"]  # this machine: CPU-only onnxruntime


def test_openvino_precision_hint(px):
    assert compile_config()["INFERENCE_PRECISION_HINT"] == "f32"
    assert "INFERENCE_PRECISION_HINT" not in compile_config("default")
    with pytest.raises(DitDeployError, match="unknown OpenVINO precision hint"):
        compile_config("int4")
    with pytest.raises(DitDeployError, match="performance hint"):
        compile_config("f32", "FAST")
    import openvino as ov

    from ditdeploy.system.altstack import keep_sigaltstack

    with keep_sigaltstack():  # the plugin swaps this thread's signal stack (ditdeploy.system.altstack)
        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in caps:
        pytest.skip("this CPU has no bf16: OpenVINO runs f32 whatever the hint")
    ref = load(px["ckpt"])
    x, t, y = _inputs(DIGITS, n=6)
    want = ref(x, t, y)
    f32 = load(px["xml"])
    bf16 = load(px["xml"], precision_hint="bf16")
    assert bf16.name == "openvino:CPU:fp32->bf16"
    e32, e16 = distances.rel_l2(f32(x, t, y), want), distances.rel_l2(bf16(x, t, y), want)
    assert e32 < FP32_REL_L2 and 1e-4 < e16 < 5e-2 and e16 > 100 * e32


def test_decoders_agree(lt):
    z = np.random.default_rng(0).standard_normal((3, 4, 4, 4), dtype=np.float32)
    ref = load_decoder(lt["vae_dir"])
    want = ref(z)
    assert isinstance(ref, Decoder) and ref.name == "torch:cpu:fp32"
    assert want.shape == (3, 3, 32, 32) and want.min() >= -1 and want.max() <= 1
    for dec in (load_decoder(lt["vae_onnx"]), load_decoder(lt["vae_onnx"], backend="openvino")):
        got = dec(z)
        assert got.shape == want.shape
        assert distances.rel_l2(got, want) < FP32_REL_L2, dec.name
    with pytest.raises(DitDeployError, match=r"must be \(N, 4, h, w\)"):
        load_decoder(lt["vae_onnx"])(z[:, :3])


def test_latent_denoiser_names_its_decoder(lt):
    den = load(lt["onnx"])
    assert den.config.space == "latent" and den.manifest["decoder"] == "vae.onnx"
    x, t, y = _inputs(den.config, n=4)
    assert distances.rel_l2(load(lt["xml"])(x, t, y), load(lt["ckpt"])(x, t, y)) < FP32_REL_L2


def test_tensorrt_manifest_without_gpu_fields_is_refused_before_loading(tmp_path):
    """An engine manifest that lacks the TensorRT version cannot be trusted: refused whether or not TRT exists."""
    from ditdeploy.runtimes.tensorrt import check_engine_compat

    plan = tmp_path / "e.plan"
    plan.write_bytes(b"x")
    m = make_manifest(plan, [plan], kind="denoiser", format="tensorrt", config={})
    write_json_atomic(tmp_path / "e.plan.json", m)
    with pytest.raises(ArtifactError, match="TensorRT version"):
        check_engine_compat(m, "10.13.0", "NVIDIA H100", (9, 0))


def test_shipped_onnx_was_exported_from_the_shipped_checkpoint():
    """digits.onnx must be re-exported whenever digits.safetensors changes (the manifest records its sha256)."""
    from ditdeploy.artifact.files import sha256_file
    from ditdeploy.artifact.manifest import load_manifest

    s = rt_artifacts.shipped()
    assert s is not None, "ditdeploy/assets/digits.safetensors + digits.onnx are shipped"
    m = load_manifest(s["onnx"])
    assert m["source"]["sha256"] == sha256_file(s["ckpt"]), "re-export digits.onnx from digits.safetensors"
    assert m["config"] == json.loads(json.dumps(DIGITS.__dict__)) and m["parity"]["passed"]
