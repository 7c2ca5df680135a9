"""``ditdeploy export --fmt triton``: the model repository, its configs against Triton's model-config schema
(tritonclient's protobuf), its manifest, and its Python-backend models on PyTriton's bundled tritonserver."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ditdeploy.errors import ArtifactError, DitDeployError
from ditdeploy.export.triton_repo import MANIFEST_NAME, RepoOptions, verify_repository, write_repository
from tests import rt_artifacts
from tests.conftest import assert_one_line_error, run_main, shipped_digits_copy

pb = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] (dev extra) not installed")
text_format = pytest.importorskip("google.protobuf.text_format")

ONNX_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64", "tensor(float16)": "TYPE_FP16"}


def parse(path: Path):
    """A config.pbtxt parsed strictly into Triton's ModelConfig message (unknown fields / bad values raise)."""
    return text_format.Parse(path.read_text(encoding="utf-8"), pb.ModelConfig())


def all_configs(repo: Path) -> list[Path]:
    return sorted(repo.glob("*/config.pbtxt")) + sorted(repo.glob("*/configs/*.pbtxt"))


@pytest.fixture(scope="module")
def digits_repo(tmp_path_factory) -> Path:
    src = shipped_digits_copy(tmp_path_factory.mktemp("src"))
    repo = tmp_path_factory.mktemp("r") / "repo"
    write_repository(src, repo, options=RepoOptions(max_batch=48, instances=4, max_queue_delay_us=700))
    return repo


@pytest.fixture(scope="module")
def latent(tmp_path_factory) -> dict[str, Path]:
    return rt_artifacts.latent_artifacts(tmp_path_factory.getbasetemp() / "rt")


def _onnx_io(path: Path) -> dict[str, tuple[str, list]]:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {a.name: (ONNX_TYPES[a.type], list(a.shape)) for a in [*s.get_inputs(), *s.get_outputs()]}


def _check_batched(cfg, onnx_path: Path, scalar_rows: set[str]) -> None:
    """Every tensor of a batched artifact config agrees with the ONNX graph itself (type, shape minus batch)."""
    io = _onnx_io(onnx_path)
    tensors = list(cfg.input) + list(cfg.output)
    assert sorted(t.name for t in tensors) == sorted(io)
    for t in tensors:
        dtype, shape = io[t.name]
        assert pb.DataType.Name(t.data_type) == dtype, t.name
        if t.name in scalar_rows:  # model shape [batch]: dims [1] reshaped to [] (Triton's documented idiom)
            assert list(t.dims) == [1] and t.HasField("reshape") and list(t.reshape.shape) == []
        else:
            assert [d if isinstance(d, int) else -1 for d in shape[1:]] == list(t.dims), t.name


def test_every_config_parses_against_the_model_config_schema(digits_repo):
    configs = all_configs(digits_repo)
    assert [str(p.relative_to(digits_repo)) for p in configs] == [
        "denoise/config.pbtxt", "generate/config.pbtxt", "info/config.pbtxt", "denoise/configs/openvino.pbtxt",
        "denoise/configs/python.pbtxt", "denoise/configs/tensorrt.pbtxt"]
    onnx = digits_repo / "denoise" / "1" / "digits.onnx"
    kinds = {}
    for p in configs[:1] + configs[3:]:
        cfg = parse(p)
        assert cfg.name == "denoise" and cfg.max_batch_size == 48
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 700
        _check_batched(cfg, onnx, {"t", "y"})
        kinds[p.stem] = (cfg.platform, cfg.backend, cfg.default_model_filename,
                         [pb.ModelInstanceGroup.Kind.Name(g.kind) for g in cfg.instance_group])
    assert kinds == {
        "config": ("onnxruntime_onnx", "", "digits.onnx", []),  # instance kind left to Triton (GPU if any)
        "tensorrt": ("tensorrt_plan", "", "model.plan", ["KIND_GPU"]),
        "openvino": ("", "openvino", "digits.onnx", ["KIND_CPU"]),
        "python": ("", "python", "", ["KIND_CPU"]),
    }
    py = parse(digits_repo / "denoise" / "configs" / "python.pbtxt")
    assert json.loads(py.parameters["inputs"].string_value) == ["x", "t", "y"]  # the denoiser(x, t, y) contract


def test_generate_config_carries_model_and_labels(digits_repo):
    from ditdeploy.artifact.manifest import Manifest

    cfg = parse(digits_repo / "generate" / "config.pbtxt")
    assert (cfg.backend, cfg.max_batch_size) == ("python", 0)
    assert [(g.count, pb.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg.instance_group] == [(4, "KIND_CPU")]
    # ditdeploy serve's wire protocol: ids in labels or names as a parameter (no BYTES input: tritonserver 2.51's
    # HTTP frontend can crash parsing a huge one), the settings as request parameters; images + labels out
    assert {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in cfg.output} == {
        "images": ("TYPE_UINT8", [-1, 8, 8, 1]), "labels": ("TYPE_INT64", [-1])}
    assert [(t.name, pb.DataType.Name(t.data_type), t.optional) for t in cfg.input] == [("labels", "TYPE_INT64", True)]
    spec = json.loads(cfg.parameters["ditdeploy"].string_value)
    assert spec["config"] == Manifest.load(digits_repo / "denoise" / "1" / "digits.onnx")["config"]
    assert spec["id2label"] == {str(i): str(i) for i in range(10)}
    assert spec["denoiser"] == {"model": "denoise", "inputs": ["x", "t", "y"], "output": "out", "max_batch": 48}
    assert spec["decoder"] is None and spec["instances"] == 4
    info = parse(digits_repo / "info" / "config.pbtxt")
    assert [t.name for t in info.input] == ["query"] and [t.name for t in info.output] == ["info"]
    assert json.loads(info.parameters["ditdeploy"].string_value) == spec


def test_manifest_lists_every_file_and_catches_a_changed_one(digits_repo, tmp_path):
    import shutil

    m = verify_repository(digits_repo)
    on_disk = sorted(str(p.relative_to(digits_repo)) for p in digits_repo.rglob("*") if p.is_file())
    assert sorted(m["files"]) == sorted(set(on_disk) - {MANIFEST_NAME})
    assert m["kind"] == "triton-repository" and m["models"] == ["denoise", "generate", "info"]
    copy = tmp_path / "copy"
    shutil.copytree(digits_repo, copy)
    cfg = copy / "denoise" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("max_batch_size: 48", "max_batch_size: 4"))
    with pytest.raises(ArtifactError, match="denoise/config.pbtxt"):
        verify_repository(copy)


def test_latent_repository_has_the_decoder(latent, tmp_path):
    repo = tmp_path / "repo"
    m = write_repository(latent["onnx"], repo)  # the decoder the denoiser's manifest names
    assert m["models"] == ["denoise", "vae_decoder", "generate", "info"]
    dec = parse(repo / "vae_decoder" / "config.pbtxt")
    assert dec.platform == "onnxruntime_onnx" and dec.default_model_filename == "vae.onnx"
    _check_batched(dec, repo / "vae_decoder" / "1" / "vae.onnx", set())
    for p in all_configs(repo):
        parse(p)
    spec = json.loads(parse(repo / "generate" / "config.pbtxt").parameters["ditdeploy"].string_value)
    assert spec["decoder"] == {"model": "vae_decoder", "input": "latents", "output": "image", "max_batch": 8}
    assert {t.name: list(t.dims) for t in parse(repo / "generate" / "config.pbtxt").output}["images"] == \
        [-1, 32, 32, 3]


def test_labels_with_quotes_and_non_ascii_survive_the_text_format(tmp_path):
    (tmp_path / "src").mkdir()
    src = shipped_digits_copy(tmp_path / "src")
    names = {i: f"digit {i}" for i in range(10)} | {3: 'crêpe "three"', 4: "back\\slash\nnewline"}
    write_repository(src, tmp_path / "repo", id2label=names)
    spec = json.loads(parse(tmp_path / "repo" / "generate" / "config.pbtxt").parameters["ditdeploy"].string_value)
    assert spec["id2label"] == {str(k): v for k, v in names.items()}


def test_refusals_leave_nothing_behind(latent, tmp_path):
    from ditdeploy.artifact.manifest import Manifest

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(DitDeployError, match="already exists"):
        write_repository(latent["onnx"], tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    lone = tmp_path / "lone"  # a latent denoiser whose decoder is gone: generate could not return images
    lone.mkdir()
    for f in ("lt.onnx", "lt.onnx.json"):
        (lone / f).write_bytes((latent["onnx"].parent / f).read_bytes())
    assert Manifest.load(lone / "lt.onnx").decoder_path() is None
    with pytest.raises(DitDeployError, match="without a VAE decoder"):
        write_repository(lone / "lt.onnx", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "lone"]  # no repo, no temp folder


def test_cli_export_triton_writes_the_repository(tmp_path):
    code, out, err = run_main(["export", "--model", "digits", "--fmt", "triton", "--out", str(tmp_path / "r"),
                               "--max-batch", "32", "--instances", "2", "--no-progress"])
    assert code == 0, err
    assert "wrote Triton model repository" in out
    m = verify_repository(tmp_path / "r")
    assert m["options"]["max_batch"] == 32 and m["options"]["instances"] == 2
    assert parse(tmp_path / "r" / "denoise" / "config.pbtxt").max_batch_size == 32
    code, out, err = run_main(["export", "--model", "digits", "--fmt", "triton", "--out", str(tmp_path / "r")])
    assert_one_line_error(code, err, "already exists")
    code, out, err = run_main(["export", "--model", "digits", "--instances", "2", "--out", str(tmp_path / "x.onnx")])
    assert_one_line_error(code, err, "--instances")


# ------------------------------------------------------------------------------------------ on a real tritonserver
def _server_env():
    from ditdeploy.serving.env import ServeEnvError
    from ditdeploy.serving.triton_local import ServerEnv

    try:
        return ServerEnv.probe()
    except ServeEnvError as e:
        pytest.skip(str(e))


def _generate(url: str, labels: list[int | str], seed: int, steps: int, cfg: float) -> np.ndarray:
    """One request through ditdeploy serve's own client (the repository speaks its wire protocol)."""
    from ditdeploy.run.generation import SampleRequest
    from ditdeploy.serving.client import generate
    from ditdeploy.serving.protocol import GenerateRequest

    images, _ = generate(url, GenerateRequest(labels=labels, sampling=SampleRequest(
        out=None, seed=seed, steps=steps, cfg_scale=cfg)), timeout=300, busy_retry_s=0)
    return images


def _local(engine: Path, labels: list[int], seed: int, steps: int, cfg: float) -> np.ndarray:
    from ditdeploy.run.generation import SampleRequest, generate

    return generate(SampleRequest(engine=engine, labels=labels, seed=seed, steps=steps, cfg_scale=cfg,
                                  out=None)).images


def _counts(metrics_url: str, model: str) -> tuple[float, float]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    got = {}
    for line in text.splitlines():
        for key in ("nv_inference_count", "nv_inference_exec_count"):
            if line.startswith(f'{key}{{model="{model}"'):
                got[key] = float(line.rsplit(" ", 1)[1])
    return got["nv_inference_count"], got["nv_inference_exec_count"]


def test_python_backend_models_on_the_bundled_server(digits_repo):
    """generate + the python variant of denoise on PyTriton's tritonserver: images equal to the library's, rows of
    concurrent requests batched into shared denoiser calls, a bad request refused while the others are served."""
    from ditdeploy.serving.client import ServerError, server_info
    from ditdeploy.serving.triton_local import LocalTriton
    from ditdeploy.sources.shipped import DIGITS_ONNX

    env = _server_env()
    with LocalTriton(env, digits_repo, config_name="python") as t:
        info = server_info(t.http)  # the info model answers as ditdeploy serve's does
        assert (info.num_classes, info.max_batch, info.default_cfg_scale) == (10, 48, 4.0)
        alone = _generate(t.http, [3, "7"], seed=5, steps=8, cfg=4.0)  # an id and a class name
        np.testing.assert_array_equal(alone, _local(DIGITS_ONNX, [3, 7], 5, 8, 4.0))  # same rows per call: exact
        rows0, calls0 = _counts(t.metrics, "denoise")
        assert (rows0, calls0) == (8 * 4, 8)  # 2 images x cond/uncond per step, one call per step
        results: dict[int, np.ndarray] = {}

        def client(i: int) -> None:
            results[i] = _generate(t.http, [i], seed=i, steps=8, cfg=4.0)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        with pytest.raises(ServerError) as bad:
            _generate(t.http, ["eleven"], seed=0, steps=8, cfg=4.0)
        for th in threads:
            th.join(300)
        assert bad.value.status == 400 and "eleven" in str(bad.value)
        rows, calls = _counts(t.metrics, "denoise")
        assert rows - rows0 == 4 * 8 * 2  # every row of the 4 requests went through denoise
        assert calls - calls0 < 4 * 8  # ... in fewer calls than one per request and step: shared calls
        for i in range(4):  # other rows in the call: fp32 batch-shape noise at most (uint8: one level)
            ref = _local(DIGITS_ONNX, [i], i, 8, 4.0)
            assert np.abs(results[i].astype(int) - ref.astype(int)).max() <= 1
    assert t.proc.returncode is not None and not t.workspace.exists()


def test_latent_repository_on_the_bundled_server(latent, tmp_path):
    """The decoder path: generate -> denoise (BLS) -> vae_decoder (BLS), equal to the library's sample; with
    max_batch 2 a guided 2-image step (4 rows) is split into two denoiser calls."""
    from ditdeploy.serving.triton_local import LocalTriton

    env = _server_env()
    repo = tmp_path / "repo"
    write_repository(latent["onnx"], repo, options=RepoOptions(instances=1, max_batch=2))
    with LocalTriton(env, repo, config_name="python") as t:
        got = _generate(t.http, [1, 4], seed=2, steps=4, cfg=1.5)
        rows, calls = _counts(t.metrics, "denoise")
    assert (rows, calls) == (4 * 4, 4 * 2)  # 4 steps x 4 rows, in calls of at most 2 rows
    ref = _local(latent["onnx"], [1, 4], 2, 4, 1.5)
    assert got.shape == ref.shape == (2, 32, 32, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # 2-row calls vs the library's 4-row call
