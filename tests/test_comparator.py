"""ditdeploy.proof.parity.compare_runs: the one "run A and B on these probe inputs and compare".

Real runtimes (ONNX Runtime sessions of a small two-layer network and of a perturbed copy, the same network in torch),
numbers checked against rel-L2 / cosine / max-abs / PSNR written out here in numpy, gates from THRESHOLDS; and a
source check that every place that verifies an artifact against a reference goes through it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import numpy as np
import pytest

from ditdeploy.errors import NumericsError
from ditdeploy.proof.parity import THRESHOLDS, compare_runs

D_IN, D_HID, D_OUT = 6, 8, 5


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w1": rng.standard_normal((D_IN, D_HID)).astype(np.float32),
            "b1": rng.standard_normal(D_HID).astype(np.float32),
            "w2": rng.standard_normal((D_HID, D_OUT)).astype(np.float32)}


def _onnx(path, w: dict[str, np.ndarray]):
    """``out = tanh(x @ w1 + b1) @ w2`` and ``hidden = tanh(x @ w1 + b1)`` as an ONNX file; an ORT session of it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ditdeploy.runtimes.onnxruntime import make_session

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Tanh", ["h1"], ["hidden"]), helper.make_node("MatMul", ["hidden", "w2"], ["out"])]
    graph = helper.make_graph(
        nodes, "two_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D_IN])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", D_OUT]),
         helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", D_HID])],
        initializer=[numpy_helper.from_array(v, k) for k, v in w.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return make_session(path)


def _numpy_net(w, x):
    hidden = np.tanh(x.astype(np.float64) @ w["w1"] + w["b1"])
    return hidden @ w["w2"], hidden


def _indep(a, r) -> dict[str, float]:
    a, r = np.asarray(a, np.float64).ravel(), np.asarray(r, np.float64).ravel()
    return {"rel_l2": float(np.sqrt(((a - r) ** 2).sum() / (r ** 2).sum())),
            "cosine": float(a @ r / np.sqrt((a @ a) * (r @ r))), "max_abs": float(np.abs(a - r).max())}


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    w = _weights()
    bent = {**w, "w2": w["w2"] * np.float32(1.02)}  # +2 % on the last layer: rel-L2 exactly 0.02 on `out`
    return w, _onnx(d / "a.onnx", w), _onnx(d / "b.onnx", bent)


def _probes():
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((b, D_IN)).astype(np.float32)} for b in (1, 3, 2)]


def _out(sess):
    return lambda f: sess.run(["out"], f)[0]


def test_per_probe_numbers_match_an_independent_computation(sessions):
    _, a, b = sessions
    probes = _probes()
    res = compare_runs(_out(a), _out(b), probes, thresholds="int8", what="bent", against="original")
    assert [p.batch for p in res.probes] == [1, 3, 2] and [p.probe for p in res.probes] == [0, 1, 2]
    for p, f in zip(res.probes, probes, strict=True):
        ra, rb = a.run(["out"], f)[0], b.run(["out"], f)[0]
        want = _indep(rb, ra)
        assert p.report.rel_l2 == pytest.approx(want["rel_l2"], rel=1e-9)
        assert p.report.rel_l2 == pytest.approx(0.02, rel=1e-5)  # the 2 % scale, through real ORT kernels
        assert p.report.cosine == pytest.approx(want["cosine"], rel=1e-12)
        assert p.report.max_abs == pytest.approx(want["max_abs"], rel=1e-9)
        assert p.reference_rms == pytest.approx(float(np.sqrt(np.mean(ra.astype(np.float64) ** 2))), rel=1e-12)
    worst = res.worst()
    assert worst["rel_l2"] == max(p.report.rel_l2 for p in res.probes)
    assert worst["cosine"] == min(p.report.cosine for p in res.probes)
    assert res.thresholds is THRESHOLDS["int8"] and res.tolerance() == {"rel_l2": 0.15, "cosine": 0.99}


def test_a_miss_of_the_thresholds_row_raises_naming_it(sessions):
    _, a, b = sessions
    with pytest.raises(NumericsError) as e:
        compare_runs(_out(a), _out(b), _probes(), thresholds="fp32", what="bent", against="original")
    msg = str(e.value)
    assert msg.startswith("bent differs from original: rel-L2 0.02 > 0.0001 at probe 1 (batch 1) (and ")
    assert msg.endswith("; nothing was written")
    # the same pair with the limit relaxed past 2 % passes: the gate is the row, not a constant in the comparator
    relaxed = THRESHOLDS["fp32"].replace(call_rel_l2=0.021, call_cosine=0.999)
    assert compare_runs(_out(a), _out(b), _probes(), thresholds=relaxed, what="bent").worst()["rel_l2"] < 0.021


def test_torch_against_onnx_runtime_with_named_outputs(sessions):
    torch = pytest.importorskip("torch")
    w, a, _ = sessions

    def net(f):
        x = torch.from_numpy(f["x"])
        hidden = torch.tanh(x @ torch.from_numpy(w["w1"]) + torch.from_numpy(w["b1"]))
        return {"out": (hidden @ torch.from_numpy(w["w2"])).numpy(), "hidden": hidden.numpy()}

    probes = _probes()
    res = compare_runs(net, lambda f: dict(zip(("out", "hidden"), a.run(["out", "hidden"], f), strict=True)),
                       probes, thresholds="fp32", what="ORT", against="torch", pooled=True)
    assert {p.output for p in res.probes} == {"out", "hidden"} and len(res.probes) == 6
    for name, k in (("out", 0), ("hidden", 1)):
        ort = np.concatenate([a.run([name], f)[0] for f in probes])
        ref = np.concatenate([_numpy_net(w, f["x"])[k] for f in probes])
        tor = np.concatenate([net(f)[name] for f in probes])
        assert res.pooled[name].rel_l2 == pytest.approx(_indep(ort, tor)["rel_l2"], rel=1e-9)
        assert res.pooled[name].rel_l2 < 1e-6 and _indep(ort, ref)["rel_l2"] < 1e-6  # fp32 reassociation only


def test_pooled_images_judged_by_psnr_and_precomputed_references(sessions):
    _, a, b = sessions
    probes = _probes()

    def img(sess):
        return lambda f: (np.clip(sess.run(["out"], f)[0], -1, 1) + 1.0) * 127.5

    refs = [img(a)(f) for f in probes]  # reference outputs computed beforehand
    got = np.concatenate([img(b)(f) for f in probes])
    mse = float(np.mean((got.astype(np.float64) - np.concatenate(refs)) ** 2))
    want = 10 * np.log10(255.0 ** 2 / mse)
    res = compare_runs(refs, img(b), probes, thresholds="int8-decoder", what="bent", pooled=True, data_range=255.0)
    assert res.pooled_psnr[None] == pytest.approx(want, rel=1e-12) and want > 30.0
    assert res.pooled[None].rel_l2 == pytest.approx(_indep(got, np.concatenate(refs))["rel_l2"], rel=1e-9)
    strict = THRESHOLDS["int8-decoder"].replace(psnr=want + 1.0)
    with pytest.raises(NumericsError, match=rf"bent differs from .*: PSNR {want:.1f} dB < {want + 1:g} dB over all "
                                            r"6 rows of 3 probes; nothing was written"):
        compare_runs(refs, img(b), probes, thresholds=strict, what="bent", pooled=True, data_range=255.0)


def test_nan_is_named_first_and_shapes_must_match(sessions):
    _, a, _ = sessions

    def nan_run(f):
        out = a.run(["out"], f)[0].copy()
        out[-1, 0] = np.nan if out.shape[0] == 3 else out[-1, 0]
        return out

    with pytest.raises(NumericsError, match=r"^x differs from the reference: NaN/Inf in the output at probe 2 "):
        compare_runs(_out(a), nan_run, _probes(), thresholds="int8", what="x")
    with pytest.raises(NumericsError, match=r"x output shape \(1, 4\) != the reference's \(1, 5\) at probe 1"):
        compare_runs(_out(a), lambda f: a.run(["out"], f)[0][:, :4], _probes(), thresholds=None, what="x")
    rec = compare_runs(_out(a), nan_run, _probes(), thresholds=None, what="x")  # recorded, not judged
    assert not rec.probes[1].report.finite and rec.probes[0].report.finite


# the places that run an artifact against a reference on probe inputs (issue 22, item 4): each must go through
# compare_runs (directly, or through export verification's check_parity, which does) and compute no rel-L2 /
# cosine / norm of its own
PLACES = [
    ("ditdeploy.export.verify", "check_parity"),
    ("ditdeploy.export.openvino", "_parity"),
    ("ditdeploy.export.cache_graphs", "_ov_parity"),
    ("ditdeploy.export.cache_graphs", "_verify"),
    ("ditdeploy.export.aoti", "verify_package"),
    ("ditdeploy.calibration.quantize", "_verify"),
    ("ditdeploy.calibration.pair_int8", "_pair_parity"),
    ("experiments.vae_int8", "_accuracy"),
    ("ditdeploy.calibration.report", "error_curve"),
    ("ditdeploy.sources.diffusers_snapshot", "_written_parity"),
    ("ditdeploy.proof.tuner", "_call_cosine"),
]
OWN_MATH = {"compare", "rel_l2", "cosine", "max_abs", "psnr", "norm"}


def _called_names(fn) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            out.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return out


@pytest.mark.parametrize(("module", "name"), PLACES)
def test_every_verification_place_uses_the_one_comparator(module, name):
    pytest.importorskip("torch")
    fn = getattr(importlib.import_module(module), name)
    called = _called_names(fn)
    assert called & {"compare_runs", "check_parity"}, f"{module}.{name} does not call parity.compare_runs"
    assert not called & OWN_MATH, f"{module}.{name} computes {sorted(called & OWN_MATH)} itself"


def test_the_source_check_catches_a_local_comparison():
    def local(a, b):
        return float(((a - b) ** 2).sum() ** 0.5 / np.linalg.norm(b))

    assert "norm" in _called_names(local) and not _called_names(local) & {"compare_runs", "check_parity"}


def test_judge_picks_the_gated_outputs_and_rows_are_per_call(sessions):
    _, a, b = sessions

    def both(sess):
        return lambda f: dict(zip(("out", "hidden"), sess.run(["out", "hidden"], f), strict=True))

    probes = _probes()
    # the bent copy differs only after the hidden layer: judging `hidden` alone passes fp32, `out` recorded
    res = compare_runs(both(a), both(b), probes, thresholds="fp32", what="bent", judge=("hidden",), pooled=True,
                       keep_outputs=True)
    assert res.pooled["hidden"].rel_l2 == 0.0 and res.pooled["out"].rel_l2 == pytest.approx(0.02, rel=1e-5)
    with pytest.raises(NumericsError, match=r"rel-L2 0.02 > 0.0001 output out over all 6 rows of 3 probes"):
        compare_runs(both(a), both(b), probes, thresholds="fp32", what="bent", judge=("out",), pooled=True)
    got, ref = res.stacked("out")
    want = [_indep(g, r)["rel_l2"] for g, r in zip(got, ref, strict=True)]
    assert len(want) == 6 and [r.rel_l2 for r in res.rows("out")] == pytest.approx(want, rel=1e-9)
