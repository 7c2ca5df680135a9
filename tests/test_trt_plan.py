"""TensorRT build plan on CPU: TRT 10 vs 11 decisions, profile validation, precision checks, metadata, dry run.

TensorRT is not installable on the development machines, so the feature detection is exercised on stand-ins that
expose exactly the documented Python API surface of each major version (TensorRT 10: ``BuilderFlag.FP16/INT8``
and ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` exist; TensorRT 11: the weak-typing flags are removed and
STRONGLY_TYPED is a deprecated no-op). The actual build is a GPU test, skipped here with its reason.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ditdeploy.artifact.files import manifest_path, write_json_atomic  # noqa: E402
from ditdeploy.artifact.manifest import make_manifest  # noqa: E402
from ditdeploy.config.variants import DIGITS  # noqa: E402
from ditdeploy.errors import ArtifactError, DitDeployError  # noqa: E402
from ditdeploy.export.trt_plan import (  # noqa: E402
    BatchProfile,
    BuildPlan,
    TrtFeatures,
    check_int8_graph,
    engine_metadata,
    make_build_plan,
)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


# ----------------------------------------------------------------------------------------------- API stand-ins

def _fake_trt(version: str, weak: bool, strongly_flag: bool = True):
    """The attribute surface feature detection looks at (names from the TRT 10 / 11 Python API docs)."""
    builder_flags = ["TF32", "REFIT", "VERSION_COMPATIBLE"] + (["FP16", "INT8", "BF16", "FP8"] if weak else [])
    net_flags = (["STRONGLY_TYPED"] if strongly_flag else []) + (["EXPLICIT_BATCH"] if weak else [])
    cfg = type("IBuilderConfig", (), {"builder_optimization_level": 3, "create_timing_cache": None,
                                       "set_memory_pool_limit": None})
    return SimpleNamespace(
        __version__=version,
        BuilderFlag=SimpleNamespace(**{f: i for i, f in enumerate(builder_flags)}),
        NetworkDefinitionCreationFlag=SimpleNamespace(**{f: i for i, f in enumerate(net_flags)}),
        IBuilderConfig=cfg,
        OnnxParser=type("OnnxParser", (), {"parse_from_file": None}),
        MemoryPoolType=SimpleNamespace(WORKSPACE=0),
    )


TRT10 = _fake_trt("10.13.0.35", weak=True)
TRT11 = _fake_trt("11.2.0.5", weak=False)


def test_feature_detection_trt10_sets_strongly_typed_and_no_precision_flags():
    f = TrtFeatures.detect(TRT10)
    assert (f.major, f.weak_typing, f.strongly_typed_default) == (10, True, False)
    assert f.network_flags() == ("STRONGLY_TYPED",)
    for p in ("fp32", "fp16", "int8"):
        assert f.builder_flags(p) == ()  # FP16/INT8 flags are not allowed on a strongly typed network
    assert f.opt_level and f.timing_cache and f.parse_from_file and f.memory_pool_limit


def test_feature_detection_trt11_has_no_weak_typing_and_no_creation_flag():
    f = TrtFeatures.detect(TRT11)
    assert (f.major, f.weak_typing, f.strongly_typed_default) == (11, False, True)
    assert f.network_flags() == ()  # strongly typed always; STRONGLY_TYPED is deprecated and ignored
    assert f.builder_flags("int8") == ()
    # 11 without the deprecated member at all still works
    assert TrtFeatures.detect(_fake_trt("11.4.0", weak=False, strongly_flag=False)).network_flags() == ()


def test_old_tensorrt_refused_with_one_line():
    f = TrtFeatures.detect(_fake_trt("8.6.1", weak=True, strongly_flag=False))
    with pytest.raises(DitDeployError, match="too old") as e:
        f.network_flags()
    assert "\n" not in str(e.value) and "ditdeploy[tensorrt]" in str(e.value)


def test_assumed_features_match_detected_decisions():
    for fake, ver in ((TRT10, "10"), (TRT11, "11")):
        a, d = TrtFeatures.assume(ver), TrtFeatures.detect(fake)
        assert a.network_flags() == d.network_flags() and not a.detected and d.detected


# ----------------------------------------------------------------------------------------------- profiles

def test_batch_profile_validation():
    assert BatchProfile(1, 4, 16).validate() == BatchProfile(1, 4, 16)
    for bad in ((0, 1, 2), (2, 1, 4), (1, 8, 4), (1, 1, 5000)):
        with pytest.raises(DitDeployError):
            BatchProfile(*bad).validate()
    with pytest.raises(DitDeployError, match="fixed batch of 2"):
        BatchProfile(1, 2, 2).validate(fixed=2)
    assert BatchProfile(2, 2, 2).validate(fixed=2).max == 2


def test_profile_shapes_follow_config():
    s = BatchProfile(1, 8, 32).shapes(DIGITS)
    assert s["x"] == ((1, 1, 8, 8), (8, 1, 8, 8), (32, 1, 8, 8))
    assert s["t"] == ((1,), (8,), (32,)) and s["y"] == s["t"]


# ----------------------------------------------------------------------------------------------- tiny ONNX graphs

def _graph(kind: str, graph_batch: int | str = "batch", zp_dtype=np.int8, zp_value: int = 0, dynamic_op: bool = False):
    """A denoiser-shaped graph (x, t, y -> out) in fp32, fp16 or explicit-Q/DQ int8."""
    c, s = DIGITS.in_channels, DIGITS.input_size
    batch = graph_batch
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, s, s])
    t = helper.make_tensor_value_info("t", TensorProto.INT64, [batch])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [batch])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 2 * c, s, s])
    inits, nodes = [], []
    src = "x"
    if kind == "fp16":
        inits.append(numpy_helper.from_array(np.ones((1,), np.float16), "w16"))
        nodes += [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
                  helper.make_node("Mul", ["x16", "w16"], ["m16"]),
                  helper.make_node("Cast", ["m16"], ["xc"], to=TensorProto.FLOAT)]
        src = "xc"
    if kind == "int8":
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                  numpy_helper.from_array(np.array(zp_value, zp_dtype), "zp")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"])]
        src = "xd"
        if dynamic_op:
            nodes.append(helper.make_node("DynamicQuantizeLinear", ["x"], ["a", "b", "c"]))
    nodes.append(helper.make_node("Concat", [src, src], ["out"], axis=1))
    g = helper.make_graph(nodes, "g", [x, t, y], [out], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _artifact(tmp_path: Path, kind: str = "fp32", name: str | None = None, artifact_kind: str = "denoiser",
              **fields) -> Path:
    p = tmp_path / (name or f"d-{kind}.onnx")
    graph_kw = {k: fields.pop(k) for k in ("graph_batch", "zp_dtype", "zp_value", "dynamic_op") if k in fields}
    onnx.save(fields.pop("model", None) or _graph(kind, **graph_kw), str(p))
    base = {"kind": artifact_kind, "format": "onnx", "precision": kind, "config": dataclasses.asdict(DIGITS),
            "opset": 18}
    if kind == "int8":
        base.update(calibration_sha256="ab" * 32, excluded_nodes=["node_conv2d", "node_linear_2"],
                    int8={"mode": "static"}, source={"onnx": "d-fp32.onnx", "precision": "fp32"})
    base.update(fields)
    write_json_atomic(manifest_path(p), make_manifest(p, [p], **base))
    return p


def test_plan_for_fp16_onnx_on_both_majors(tmp_path):
    p = _artifact(tmp_path, "fp16")
    for fake, flags in ((TRT10, ["STRONGLY_TYPED"]), (TRT11, [])):
        plan = make_build_plan(p, precision="fp16", min_batch=1, opt_batch=4, max_batch=16, opt_level=5,
                               timing_cache=tmp_path / "tc.cache", features=TrtFeatures.detect(fake))
        d = plan.to_dict()
        assert d["precision"] == "fp16" and d["network_flags"] == flags and d["builder_flags"] == []
        assert d["strongly_typed"] is True and d["opt_level"] == 5
        assert d["input_shapes"]["x"] == {"min": [1, 1, 8, 8], "opt": [4, 1, 8, 8], "max": [16, 1, 8, 8]}
        assert BuildPlan.from_dict(json.loads(plan.to_json())) == plan


def test_requested_precision_must_match_the_onnx(tmp_path):
    p = _artifact(tmp_path, "fp32")
    with pytest.raises(DitDeployError, match="needs a fp16 ONNX") as e:
        make_build_plan(p, precision="fp16")
    assert "--precision fp16" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DitDeployError, match="needs a int8 ONNX"):
        make_build_plan(p, precision="int8")
    assert make_build_plan(p).precision == "fp32"


def test_manifest_precision_cross_checked_against_graph(tmp_path):
    p = _artifact(tmp_path, "fp32", name="liar.onnx", precision="fp16")
    with pytest.raises(ArtifactError, match="graph looks fp32"):
        make_build_plan(p)


def test_int8_plan_carries_calibration_and_exclusions(tmp_path):
    p = _artifact(tmp_path, "int8")
    plan = make_build_plan(p, precision="int8", features=TrtFeatures.detect(TRT11))
    assert plan.calibration_sha256 == "ab" * 32
    assert plan.excluded_nodes == ("node_conv2d", "node_linear_2")
    assert any("explicit quantization: 1 Q / 1 DQ" in n for n in plan.notes)


def test_int8_graph_rules_for_tensorrt(tmp_path):
    ok = _graph("int8")
    assert check_int8_graph(ok) == {"QuantizeLinear": 1, "DequantizeLinear": 1}
    with pytest.raises(DitDeployError, match="UINT8"):
        check_int8_graph(_graph("int8", zp_dtype=np.uint8, zp_value=128))
    with pytest.raises(DitDeployError, match="non-zero zero point"):
        check_int8_graph(_graph("int8", zp_value=3))
    with pytest.raises(DitDeployError, match="DynamicQuantizeLinear"):
        check_int8_graph(_graph("int8", dynamic_op=True))
    with pytest.raises(DitDeployError, match="no QuantizeLinear"):
        check_int8_graph(_graph("fp32"))


def test_dynamic_int8_artifact_refused(tmp_path):
    p = _artifact(tmp_path, "int8", name="dyn.onnx", int8={"mode": "dynamic"})
    with pytest.raises(DitDeployError, match="dynamic INT8"):
        make_build_plan(p)


def test_default_and_fixed_batches(tmp_path):
    p = _artifact(tmp_path, "fp32")
    b = make_build_plan(p).profile
    assert (b.min, b.opt, b.max) == (1, 8, 32)
    assert make_build_plan(p, max_batch=4).profile == BatchProfile(1, 4, 4)  # opt clamped to max
    capped = _artifact(tmp_path, "fp32", name="capped.onnx", batch={"min": 1, "opt": 2, "max": 6})
    assert make_build_plan(capped).profile.max == 6
    with pytest.raises(DitDeployError, match="recorded max batch 6"):
        make_build_plan(capped, max_batch=8)
    fixed = _artifact(tmp_path, "fp32", name="fixed.onnx", graph_batch=2)
    assert make_build_plan(fixed).profile == BatchProfile(2, 2, 2)
    with pytest.raises(DitDeployError, match="fixed batch of 2"):
        make_build_plan(fixed, max_batch=4)


def test_bad_knobs(tmp_path):
    p = _artifact(tmp_path, "fp32")
    with pytest.raises(DitDeployError, match="0..5"):
        make_build_plan(p, opt_level=7)
    with pytest.raises(DitDeployError, match="directory"):
        make_build_plan(p, timing_cache=tmp_path)
    with pytest.raises(DitDeployError, match="min <= opt <= max"):
        make_build_plan(p, min_batch=4, opt_batch=2, max_batch=8)
    dec = _artifact(tmp_path, "fp32", name="dec.onnx", artifact_kind="decoder")
    with pytest.raises(ArtifactError, match="decoder"):
        make_build_plan(dec)


def test_engine_metadata_is_what_the_runtime_checks(tmp_path):
    """The manifest fields the TensorRT runtime reads at load (version, GPU, compute capability) round-trip."""
    from ditdeploy.runtimes.tensorrt import check_engine_compat, engine_build_info

    p = _artifact(tmp_path, "int8")
    src_m = json.loads(manifest_path(p).read_text())
    plan = make_build_plan(p, features=TrtFeatures.detect(TRT10))
    meta = engine_metadata(plan, "NVIDIA H100 80GB HBM3", (9, 0), src_m, seconds=12.3)
    info = engine_build_info(meta)
    assert info["trt_version"] == "10.13.0.35" and info["compute_capability"] == (9, 0)
    assert info["gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert meta["precision"] == "int8" and meta["calibration_sha256"] == "ab" * 32
    assert meta["batch"] == {"min": 1, "opt": 8, "max": 32} and meta["format"] == "tensorrt"
    check_engine_compat(meta, "10.13.0.35", "NVIDIA H100 80GB HBM3", (9, 0))  # same build: loads
    with pytest.raises(ArtifactError, match="TensorRT"):
        check_engine_compat(meta, "11.2.0", "NVIDIA H100 80GB HBM3", (9, 0))
    with pytest.raises(ArtifactError, match="compute capability"):
        check_engine_compat(meta, "10.13.0.35", "NVIDIA L4", (8, 9))


def test_dry_run_writes_plan_without_tensorrt(tmp_path):
    from ditdeploy.export.tensorrt import build_engine, dry_run_path

    p = _artifact(tmp_path, "fp16")
    out = tmp_path / "e.plan"
    d = build_engine(p, out, min_batch=2, opt_batch=2, max_batch=8, opt_level=4, dry_run=True)
    written = json.loads(dry_run_path(out).read_text())
    assert written["profile"] == {"min": 2, "opt": 2, "max": 8} and written["opt_level"] == 4
    assert written["precision"] == "fp16" and d["written_to"].endswith("e.buildplan.json")
    assert not out.exists()  # a dry run builds nothing
    assert d["trt_lint"]["passed"] is True and d["trt_lint"]["op_counts"] == {"Cast": 2, "Mul": 1, "Concat": 1}
    with pytest.raises(DitDeployError, match=r"\.plan"):
        build_engine(p, tmp_path / "e.bin", dry_run=True)


def test_dry_run_refuses_a_graph_the_lint_fails(tmp_path):
    """A CPU-only op (com.microsoft FastGelu) in the ONNX: exit 1 with the lint's finding, no plan written."""
    from ditdeploy.export.tensorrt import build_engine, dry_run_path
    from ditdeploy.export.trt_lint import LintError

    m = _graph("fp32")
    m.graph.node.insert(0, helper.make_node("FastGelu", ["x"], ["g"], name="fg", domain="com.microsoft"))
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    p = _artifact(tmp_path, "fp32", model=m)
    with pytest.raises(LintError, match=r"\[domain\] FastGelu 'fg'") as e:
        build_engine(p, tmp_path / "e.plan", dry_run=True, progress=False)
    assert e.value.exit_code == 1
    assert not dry_run_path(tmp_path / "e.plan").exists()


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_missing_tensorrt_is_one_line_naming_the_extra(tmp_path):
    from ditdeploy.export.tensorrt import build_engine

    p = _artifact(tmp_path, "fp32")
    with pytest.raises(DitDeployError) as e:
        build_engine(p, tmp_path / "e.plan")
    msg = str(e.value)
    assert "\n" not in msg and "ditdeploy[tensorrt]" in msg and "pypi.nvidia.com" in msg
    assert not (tmp_path / "e.plan").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and an NVIDIA GPU (not available on the dev machines)")
def test_build_fp32_engine_on_gpu(tmp_path):  # pragma: no cover - GPU only
    from ditdeploy.export.tensorrt import build_engine

    p = _artifact(tmp_path, "fp32")
    m = build_engine(p, tmp_path / "e.plan", max_batch=4, timing_cache=tmp_path / "tc.cache")
    assert (tmp_path / "e.plan").stat().st_size > 0 and (tmp_path / "tc.cache").exists()
    assert m["tensorrt"]["gpu_name"] and m["tensorrt"]["compute_capability"] and m["tensorrt"]["tf32"] is False
