"""TensorRT backend: the pure-python parts (manifest/engine compatibility, profile parsing, chunking) on CPU.

Running an engine needs an NVIDIA GPU with TensorRT + cuda-python; that test skips with the reason here.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest

from ditdeploy.artifact.files import write_json_atomic
from ditdeploy.artifact.manifest import make_manifest
from ditdeploy.config.variants import DIGITS
from ditdeploy.errors import ArtifactError, DitDeployError, MissingDependencyError
from ditdeploy.runtimes import load, resolve_backend
from ditdeploy.runtimes.base import chunked
from ditdeploy.runtimes.tensorrt import check_engine_compat, engine_build_info, pad_batch, profile_batch_range

H100 = ("NVIDIA H100 80GB HBM3", (9, 0))
MANIFEST = {"tensorrt": {"version": "10.13.0.35", "gpu": {"name": H100[0], "compute_capability": [9, 0]}}}


def test_build_info_reads_several_layouts():
    assert engine_build_info(MANIFEST) == {
        "trt_version": "10.13.0.35", "gpu_name": H100[0], "compute_capability": (9, 0),
        "version_compatible": False, "hardware_compatible": False,
    }
    flat = {"tensorrt": {"trt_version": "11.2.0", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}}
    info = engine_build_info(flat)
    assert (info["trt_version"], info["gpu_name"], info["compute_capability"]) == ("11.2.0", "NVIDIA L4", (8, 9))
    top = {"tools": {"tensorrt": "10.8.0"}, "gpu": {"name": "A100", "compute_capability": "sm_80"}}
    info = engine_build_info(top)
    assert (info["trt_version"], info["compute_capability"]) == ("10.8.0", (8, 0))


def test_compat_accepts_the_same_version_and_gpu():
    check_engine_compat(MANIFEST, "10.13.0.35", *H100)
    check_engine_compat(MANIFEST, "10.13.0", *H100)  # build number not recorded by the runtime is fine


@pytest.mark.parametrize("running", ["10.13.1", "10.12.0", "11.0.0"])
def test_compat_rejects_another_trt_version(running):
    with pytest.raises(ArtifactError, match=r"built with TensorRT 10\.13\.0, running TensorRT"):
        check_engine_compat(MANIFEST, running, *H100)


def test_version_compatible_engines_need_only_the_same_major():
    m = {"tensorrt": {**MANIFEST["tensorrt"], "version_compatible": True}}
    check_engine_compat(m, "10.14.1", *H100)
    with pytest.raises(ArtifactError):
        check_engine_compat(m, "11.0.0", *H100)


def test_compat_rejects_another_gpu():
    with pytest.raises(ArtifactError, match=r"compute capability 9\.0 .* this GPU is 8\.9"):
        check_engine_compat(MANIFEST, "10.13.0", "NVIDIA L4", (8, 9))
    with pytest.raises(ArtifactError, match="built on NVIDIA H100"):
        check_engine_compat(MANIFEST, "10.13.0", "NVIDIA H100 PCIe", (9, 0))
    check_engine_compat(MANIFEST, "10.13.0", "NVIDIA H100 PCIe", (9, 0), strict_gpu_name=False)
    hw = {"tensorrt": {**MANIFEST["tensorrt"], "hardware_compatibility_level": "AMPERE_PLUS"}}
    check_engine_compat(hw, "10.13.0", "NVIDIA L4", (8, 9))


def test_compat_needs_a_recorded_version():
    with pytest.raises(ArtifactError, match="does not record the TensorRT version"):
        check_engine_compat({"gpu": {"name": "x"}}, "10.13.0", *H100)


def test_profile_batch_range():
    assert profile_batch_range([(2, 4, 32, 32), (8, 4, 32, 32), (16, 4, 32, 32)]) == (2, 16)
    for bad in ([], [(0, 4), (1, 4), (2, 4)], [(8, 4), (8, 4), (4, 4)]):
        with pytest.raises(ArtifactError):
            profile_batch_range(bad)


def test_batch_below_the_profile_minimum_is_padded_and_rows_kept():
    """Padding repeats the last row; a row-independent function on the padded batch gives the same first rows."""
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((3, 2, 2)).astype(np.float32), np.array([5, 600, 999])
    (xp, tp), n = pad_batch((x, t), 8)
    assert n == 3 and xp.shape == (8, 2, 2) and tp.tolist() == [5, 600, 999] + [999] * 5
    np.testing.assert_array_equal(xp[:3], x)

    def per_row(a, b):  # stands for the denoiser: rows independent
        return a.sum(axis=(1, 2)) * b

    np.testing.assert_array_equal(per_row(xp, tp)[:n], per_row(x, t))
    same, n2 = pad_batch((x, t), 2)
    assert n2 == 3 and same[0] is x
    with pytest.raises(DitDeployError, match="empty"):
        pad_batch((x[:0], t[:0]), 2)


@pytest.mark.skipif(importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None,
                    reason="cuda-python (cuda-bindings) is not installed; it comes with ditdeploy[tensorrt]")
def test_cuda_errors_are_reported_by_name():
    """Real cuda-python: without a driver (or with device 9999 on a GPU machine) cudaSetDevice fails, and the
    message carries cudaGetErrorName's text, not a number."""
    from cuda.bindings import runtime as rt

    from ditdeploy.runtimes.trt_cuda import ck, cuda_error_name

    assert cuda_error_name(rt, rt.cudaError_t.cudaErrorMemoryAllocation) == "cudaErrorMemoryAllocation"
    assert ck(rt, rt.cudaGetErrorName(rt.cudaError_t.cudaSuccess), "cudaGetErrorName") == b"cudaSuccess"
    with pytest.raises(DitDeployError, match=r"^CUDA error in cudaSetDevice: cudaError[A-Z]\w+$"):
        ck(rt, rt.cudaSetDevice(9999), "cudaSetDevice")


def test_chunking_respects_max_batch_and_order():
    seen = []

    def fn(x, t):
        seen.append(len(x))
        return x * 2 + t[:, None]

    x = np.arange(11 * 3, dtype=np.float32).reshape(11, 3)
    t = np.arange(11, dtype=np.float32)
    out = chunked(fn, (x, t), 4)
    assert seen == [4, 4, 3]
    np.testing.assert_array_equal(out, x * 2 + t[:, None])
    seen.clear()
    chunked(fn, (x, t), None)
    assert seen == [11]


def test_suffixes_pick_tensorrt(tmp_path):
    for s in (".plan", ".engine"):
        assert resolve_backend(tmp_path / f"m{s}") == "tensorrt"
    with pytest.raises(DitDeployError, match="cannot read .onnx"):
        resolve_backend(tmp_path / "m.onnx", "trt")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_missing_tensorrt_is_one_line_naming_the_extra(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"not a real engine")
    m = make_manifest(plan, [plan], kind="denoiser", format="tensorrt", precision="fp16",
                      config=dataclasses.asdict(DIGITS), batch={"min": 1, "opt": 8, "max": 16}, **MANIFEST)
    write_json_atomic(tmp_path / "m.plan.json", m)
    with pytest.raises(MissingDependencyError) as e:
        load(plan, trust_native_code=True)  # trusted: the next step needs TensorRT
    msg = str(e.value)
    assert "\n" not in msg and "ditdeploy[tensorrt]" in msg


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="TensorRT is not installable on this machine (no NVIDIA GPU); the engine path is "
                           "covered by the compatibility/padding/chunking tests above and needs a GPU run")
def test_fp32_engine_matches_onnx_runtime_on_gpu(digits_artifacts, tmp_path):  # pragma: no cover - needs a GPU
    """Build a digits fp32 engine (profile 2..4, TF32 off) and run it plain and with CUDA graphs: a batch of 1 (padded
    to the minimum), 3, and 7 (chunked) against ONNX Runtime CPU fp32 on the same inputs, rel-L2 <= 1e-5 (fp32
    arithmetic both sides; TF32 would give ~1e-3)."""
    from ditdeploy.export.tensorrt import build_engine
    from ditdeploy.proof.parity import compare

    plan = tmp_path / "d.plan"
    m = build_engine(digits_artifacts["onnx"], plan, min_batch=2, opt_batch=2, max_batch=4, progress=False)
    assert m["tensorrt"]["tf32"] is False and m["batch"] == {"min": 2, "opt": 2, "max": 4}
    ref = load(digits_artifacts["onnx"], backend="onnxruntime", providers="cpu")
    rng = np.random.default_rng(0)
    for graph in (False, True):
        den = load(plan, cuda_graph=graph)
        assert (den.min_batch, den.max_batch) == (2, 4)
        for n in (1, 3, 7):
            x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
            t, y = rng.integers(0, 1000, n), rng.integers(0, 11, n)
            got, want = den(x, t, y), ref(x, t, y)
            assert got.shape == want.shape and compare(got, want).rel_l2 <= 1e-5, (graph, n)
        den.close()
