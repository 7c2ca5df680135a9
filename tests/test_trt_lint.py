"""TensorRT-readiness lint (no GPU): every graph the project exports passes, and a small hand-made graph that breaks
each rule fails with that rule named.

Artifacts are built in-process with the project's exporters (digits-sized, random weights): fp32, fp16, static INT8
Q/DQ from fp32 (the ORT/OpenVINO artifact) and from fp16 (what ``export --fmt trt --precision int8`` builds), the
VAE decoder, the feature-reuse full + light graphs (``export --cache-graphs``); the CPU-only INT8 (uint8 activations + ONNX Runtime fusions) must FAIL, which proves the lint reads the
real graphs rather than passing everything.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from conftest import run_main  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ditdeploy.export.trt_lint import LintError, lint_model, lint_onnx, require_lint_pass  # noqa: E402
from ditdeploy.export.trt_ops import load_ops, parse_operators_md  # noqa: E402

F, H, I8, U8, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT64


# ----------------------------------------------------------------------------------------------- the data file

def test_support_list_is_the_cited_release():
    ops = load_ops()
    assert ops["source"]["branch"] == "10.1-GA" and len(ops["source"]["commit"]) == 40
    assert ops["opset"] == {"min": 9, "max": 20}
    o = ops["operators"]
    assert len(o) > 180
    assert o["LayerNormalization"]["supported"] and "Only the first output" in o["LayerNormalization"]["restrictions"]
    assert not o["DynamicQuantizeLinear"]["supported"] and not o["QLinearMatMul"]["supported"]
    assert o["DequantizeLinear"]["types"] == ["INT8", "FLOAT8E4M3FN", "INT4"]
    for rule in o.values():  # every type name maps to an ONNX TensorProto name
        for t in rule["types"]:
            assert hasattr(TensorProto, t), t


def test_parse_operators_md_rows():
    md = ("TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20.\n"
          "| Operator | Supported | Supported Types | Restrictions |\n|---|---|---|---|\n"
          "| Abs | Y | FP32, FP16, INT64 |\n| Det | N |\n"
          "| Resize | Y | FP32 | modes: `a`.<br />no antialias.|\n")
    d = parse_operators_md(md)
    assert d["opset"] == {"min": 9, "max": 20}
    assert d["operators"]["Abs"] == {"supported": True, "types": ["FLOAT", "FLOAT16", "INT64"], "restrictions": ""}
    assert d["operators"]["Det"]["supported"] is False
    assert d["operators"]["Resize"]["restrictions"] == "modes: `a`. no antialias."


# ----------------------------------------------------------------------------------------------- project artifacts

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """digits fp32 / fp16 / INT8 Q/DQ (from fp32 and from fp16) / CPU-only INT8 / feature-reuse graph pair, and a
    tiny VAE decoder."""
    from rt_artifacts import latent_artifacts

    from ditdeploy.calibration.capture import CaptureSettings, capture_calibration_set
    from ditdeploy.calibration.quantize import quantize_int8
    from ditdeploy.export.cache_graphs import export_cache_graphs, light_path
    from ditdeploy.export.onnx import export_denoiser_onnx
    from ditdeploy.export.randomize import random_model
    from ditdeploy.runtimes import load

    d = tmp_path_factory.mktemp("lint")
    out = {"fp32": d / "fp32.onnx", "fp16": d / "fp16.onnx"}
    export_denoiser_onnx(random_model("digits", seed=1), out["fp32"], progress=False)
    export_denoiser_onnx(random_model("digits", seed=1), out["fp16"], precision="fp16", progress=False)
    calib = d / "calib.npz"
    capture_calibration_set(load(out["fp32"], threads=1), calib,
                            CaptureSettings(samples=4, steps=5, batch_size=4, val_samples=2), progress=False)
    for name, src, kw in (("int8", "fp32", {}), ("int8_from_fp16", "fp16", {}),
                          ("int8_cpu", "fp32", {"activations": "uint8"})):
        out[name] = d / f"{name}.onnx"
        quantize_int8(out[src], out[name], calib, progress=False, verify=False, **kw)
    out["vae"] = latent_artifacts(d)["vae_onnx"]
    out["cache_full"] = d / "cache.onnx"  # feature-reuse pair (export --cache-graphs): full + light graph
    export_cache_graphs(random_model("digits", seed=1), out["cache_full"], verify=False)
    out["cache_light"] = light_path(out["cache_full"])
    return out


@pytest.mark.parametrize("kind", ["fp32", "fp16", "int8", "int8_from_fp16", "vae", "cache_full", "cache_light"])
def test_every_exported_graph_passes(exported, kind):
    rep = lint_onnx(exported[kind])
    assert rep.passed, rep.format()
    assert rep.nodes > 50
    if kind != "vae":
        assert rep.op_counts["LayerNormalization"] > 0
        assert any("'t' is int64" in n for n in rep.notes)
    if kind.startswith("int8"):
        assert rep.op_counts["QuantizeLinear"] > 0 and rep.op_counts["DequantizeLinear"] > 0


def test_cpu_only_int8_artifact_fails(exported):
    rep = lint_onnx(exported["int8_cpu"])
    rules = {f.rule for f in rep.violations}
    assert "domain" in rules and "qdq-zero-point" in rules, rep.format()
    with pytest.raises(LintError, match="not TensorRT-ready"):
        require_lint_pass(rep)


def test_cli_pass_and_fail(exported, tmp_path):
    code, out, err = run_main(["check", "--trt-lint", exported["int8_from_fp16"], "--json", tmp_path / "r.json"])
    assert code == 0, err
    assert "PASS: no violations" in out
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    code, out, err = run_main(["check", "--trt-lint", exported["int8_cpu"]])
    assert code == 1 and "FAIL:" in out and "violation [domain]" in out
    assert err.strip().splitlines()[-1].startswith("error: int8_cpu.onnx is not TensorRT-ready")
    code, _, err = run_main(["check", "--trt-lint", tmp_path / "missing.onnx"])
    assert code == 2 and "no such ONNX file" in err
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a protobuf model" * 10)
    code, _, err = run_main(["check", "--trt-lint", tmp_path / "junk.onnx"])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: junk.onnx is not a readable ONNX model")
    code, _, err = run_main(["check", "--trt-lint", exported["fp32"], "--engine", exported["fp32"]])
    assert code == 2 and "--trt-lint runs alone" in err


# ----------------------------------------------------------------------------------------------- hand-made graphs

def _model(nodes, inputs, outputs, inits=(), opset=18, domains=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(g, opset_imports=imports)


def _vi(name, dtype=F, shape=(2, 4)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _c(name, value, dtype=None):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _rules(model):
    return sorted({f.rule for f in lint_model(model).violations})


def _qdq(scale=0.1, zp=0, zp_dtype=np.int8, scale_dtype=np.float32, data=F, with_zp=True):
    """x -> Q -> DQ -> out with the given scale / zero point."""
    ins = ["x", "s", "zp"] if with_zp else ["x", "s"]
    nodes = [helper.make_node("QuantizeLinear", ins, ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", *ins[1:]], ["out"], name="dq")]
    inits = [_c("s", scale, scale_dtype)] + ([_c("zp", zp, zp_dtype)] if with_zp else [])
    return _model(nodes, [_vi("x", data)], [_vi("out", data)], inits)


def test_valid_qdq_passes_in_fp32_and_fp16():
    assert _rules(_qdq()) == []
    assert _rules(_qdq(scale_dtype=np.float16, data=H)) == []


@pytest.mark.parametrize("kw, rule, words", [
    ({"zp": 3}, "qdq-zero-point", "is not 0"),
    ({"zp": 128, "zp_dtype": np.uint8}, "qdq-zero-point", "type UINT8"),
    ({"with_zp": False}, "qdq-zero-point", "uint8"),
    ({"scale": -0.5}, "qdq-scale", "positive"),
    ({"scale": 0.0}, "qdq-scale", "positive"),
    ({"scale": np.inf}, "qdq-scale", "positive"),
    ({"scale_dtype": np.float16}, "qdq-type", "FLOAT16 scale but 'x' is FLOAT"),
])
def test_qdq_rules(kw, rule, words):
    rep = lint_model(_qdq(**kw))
    hits = [f for f in rep.violations if f.rule == rule]
    assert hits and words in hits[0].message, rep.format()


def test_qdq_scale_must_be_constant():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["out"], name="dq")]
    m = _model(nodes, [_vi("x"), _vi("s", F, ())], [_vi("out")], [_c("zp", 0, np.int8)])
    assert _rules(m) == ["qdq-scale"]


def test_fp16_scale_weight_dq_feeding_fp32_matmul():
    """A weight DQ with an fp16 scale makes fp16 data; its fp32 consumer is the mismatch."""
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "zp"], ["wd"], name="dq"),
             helper.make_node("MatMul", ["x", "wd"], ["out"], name="mm")]
    inits = [_c("w", np.ones((4, 4)), np.int8), _c("s", 0.1, np.float16), _c("zp", 0, np.int8)]
    rep = lint_model(_model(nodes, [_vi("x")], [_vi("out")], inits))
    assert [f.rule for f in rep.violations] == ["qdq-type"] and "'x' is FLOAT" in rep.violations[0].message


def test_layernorm_with_three_outputs():
    ln = helper.make_node("LayerNormalization", ["x", "g", "b"], ["out", "mean", "inv_std"], name="ln", axis=-1)
    m = _model([ln], [_vi("x")], [_vi("out")], [_c("g", np.ones(4), np.float32), _c("b", np.zeros(4), np.float32)])
    assert _rules(m) == ["outputs"]
    ln1 = helper.make_node("LayerNormalization", ["x", "g", "b"], ["out"], name="ln", axis=-1)
    m1 = _model([ln1], [_vi("x")], [_vi("out")], [_c("g", np.ones(4), np.float32), _c("b", np.zeros(4), np.float32)])
    assert _rules(m1) == []


def test_unsupported_unknown_and_foreign_ops():
    assert _rules(_model([helper.make_node("Unique", ["x"], ["out"], name="u")], [_vi("x")], [_vi("out")])) \
        == ["operator"]
    assert _rules(_model([helper.make_node("NotAnOp", ["x"], ["out"], name="n")], [_vi("x")], [_vi("out")])) \
        == ["operator"]
    fg = helper.make_node("FastGelu", ["x"], ["out"], name="fg", domain="com.microsoft")
    assert _rules(_model([fg], [_vi("x")], [_vi("out")], domains=["com.microsoft"])) == ["domain"]


def test_type_constant_input_attribute_and_opset_rules():
    mm = helper.make_node("MatMul", ["a", "b"], ["out"], name="mm")  # MatMul: FP32/FP16/BF16 only
    assert _rules(_model([mm], [_vi("a", TensorProto.INT32, (2, 2)), _vi("b", TensorProto.INT32, (2, 2))],
                         [_vi("out", TensorProto.INT32, (2, 2))])) == ["type"]
    rm = helper.make_node("ReduceMean", ["x", "axes"], ["out"], name="rm")  # axes from a graph input
    assert _rules(_model([rm], [_vi("x"), _vi("axes", I64, (1,))], [_vi("out")])) == ["constant-input"]
    rm_ok = _model([rm], [_vi("x")], [_vi("out")], [_c("axes", [1], np.int64)])
    assert _rules(rm_ok) == []
    rs = helper.make_node("Resize", ["x", "", "sc"], ["out"], name="rs", mode="cubic", antialias=1)
    m = _model([rs], [_vi("x", F, (1, 1, 2, 2))], [_vi("out", F, (1, 1, 4, 4))],
               [_c("sc", [1, 1, 2, 2], np.float32)])
    msgs = [f.message for f in lint_model(m).violations]
    assert any("mode='cubic'" in s for s in msgs) and any("antialias=1" in s for s in msgs)
    mp = helper.make_node("MaxPool", ["x"], ["out"], name="mp", kernel_shape=[2], dilations=[2])
    assert _rules(_model([mp], [_vi("x", F, (1, 1, 4))], [_vi("out", F, (1, 1, 2))])) == ["attribute"]
    relu = helper.make_node("Relu", ["x"], ["out"], name="r")
    assert _rules(_model([relu], [_vi("x")], [_vi("out")], opset=21)) == ["opset"]
    assert _rules(_model([relu], [_vi("x")], [_vi("out")], opset=20)) == []


def test_export_trt_dry_run_runs_the_lint(tmp_path):
    code, out, err = run_main(["export", "--model", "digits", "--fmt", "trt", "--dry-run", "--no-verify",
                               "--out", tmp_path / "d.plan"])
    assert code == 0, err
    assert "TensorRT lint passed on" in out and (tmp_path / "d.buildplan.json").exists()
    assert not (tmp_path / "d.plan").exists()
