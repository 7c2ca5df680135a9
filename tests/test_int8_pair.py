"""INT8 and less work together (#24 item 2) and the faster calibrate -> INT8 chain (#24 item 4), on the shipped
digits model: the two-graph export quantized from one calibration set, run with feature reuse and a guidance
interval on ONNX Runtime and OpenVINO; calibrate's validation budget, shared batches and recorded outputs; INT8 from
an existing fp32 export without a second export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ditdeploy.artifact.files import manifest_path, sha256_file

pytest.importorskip("onnxruntime.quantization")
torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The shipped digits model as an fp32 pair, a calibration set captured from that pair, and its INT8 pair."""
    from ditdeploy.calibration.capture import CaptureSettings, capture_calibration_set
    from ditdeploy.calibration.pair_int8 import quantize_cache_pair
    from ditdeploy.export.cache_graphs import export_cache_graphs
    from ditdeploy.runtimes import load
    from ditdeploy.sources.checkpoints import load_model
    from ditdeploy.sources.shipped import require_digits_checkpoint

    d = tmp_path_factory.mktemp("int8pair")
    fp32 = d / "pair.onnx"
    export_cache_graphs(load_model(require_digits_checkpoint()), fp32)
    calib = d / "calib.npz"
    capture_calibration_set(load(fp32), calib, CaptureSettings(samples=8, steps=25, batch_size=8),
                            source={"path": fp32.name, "sha256": sha256_file(fp32), "backend": "onnxruntime"},
                            progress=False)
    q = d / "pair-int8.onnx"
    m = quantize_cache_pair(fp32, q, calib, progress=False)
    return {"dir": d, "fp32": fp32, "calib": calib, "int8": q, "manifest": m}


def test_pair_roles_match_the_plain_graph(pair):
    """The pair wraps the DiT as `model`: its patch-embedding Conv is still an embedder (kept in float), so the
    INT8 pair quantizes exactly the 16 token GEMMs of the plain graph (it quantized the Conv too before)."""
    import onnx

    from ditdeploy.calibration.nodes import classify_nodes

    roles = {r.module: r.role for r in classify_nodes(onnx.load(str(pair["fp32"]), load_external_data=False))}
    assert roles["x_embedder.proj"] == "embedder" and roles["final_layer.linear"] == "final"
    assert roles["t_embedder.mlp.0"] == "embedder" and roles["blocks.0.mlp.fc1"] == "linear"
    q = pair["manifest"]["int8"]
    assert q["quantized_nodes"] == 16 and q["quantized_roles"] == {"linear": 16}


def test_int8_pair_files_and_parity(pair):
    import onnx

    from ditdeploy.calibration.quantize import count_qdq
    from ditdeploy.export.cache_graphs import light_path

    m, q = pair["manifest"], pair["int8"]
    light = light_path(q)
    assert set(m["files"]) == {q.name, light.name} and m["precision"] == "int8"
    assert m["files"][q.name]["sha256"] == sha256_file(q)
    full_g, light_g = (onnx.load(str(p), load_external_data=False) for p in (q, light))
    assert count_qdq(full_g)["DequantizeLinear"] >= 32 and count_qdq(light_g) == {}
    # the light graph is the fp32 pair's, byte for byte; both graphs carry the source pair's export id
    assert sha256_file(light) == sha256_file(light_path(pair["fp32"]))
    ids = {p.key: p.value for p in full_g.metadata_props}["ditdeploy.export_id"]
    assert ids == m["cache_graphs"]["export_id"] == json.loads(manifest_path(pair["fp32"]).read_text())[
        "cache_graphs"]["export_id"]
    par = m["cache_graphs"]["parity"]
    assert par["inputs"] == 16 and par["inputs_from"] == "held-out validation inputs"
    for k in ("full_out", "light_out"):
        assert 0.99 <= par[k]["cosine"] < 1.0  # int8 limit of ditdeploy.proof.parity, and not a copy of fp32
    # independent recomputation of the light-step number with ONNX Runtime
    from ditdeploy.calibration.capture import load_calibration
    from ditdeploy.runtimes.onnxruntime import make_session

    v = load_calibration(pair["calib"]).val
    feed = {"x": v["x"][:4], "t": v["t"][:4], "y": v["y"][:4]}
    ref = make_session(pair["fp32"]).run(["out", "cache"], feed)
    got = make_session(q).run(["out", "cache"], feed)
    cos = float(np.dot(got[0].ravel(), ref[0].ravel()) / np.linalg.norm(got[0]) / np.linalg.norm(ref[0]))
    assert 0.99 < cos < 1.0 and np.abs(got[1] - ref[1]).max() > 0  # the cache comes from the int8 graph


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int8_pair_samples_with_less_work(pair, backend):
    """INT8 + feature reuse + guidance interval end to end: same work counts as the fp32 pair, and the images stay
    close to the fp32 pair's with the same settings (int8 per-image PSNR, ditdeploy.proof.parity's int8 row)."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    from ditdeploy.proof import distances
    from ditdeploy.proof.parity import thresholds_for
    from ditdeploy.run import generation

    def run(engine):
        req = generation.SampleRequest(engine=engine, backend=backend, num_per_label=2, steps=20, out=None,
                                       cfg_interval=[150, 750], cache_interval=2)
        return generation.generate(req)

    a, b = run(pair["int8"]), run(pair["fp32"])
    assert a.work["light_rows"] == b.work["light_rows"] > 0 and a.work["rows"] == b.work["rows"]
    assert "int8" in a.backend
    psnr = distances.psnr(a.images.astype(np.float64), b.images.astype(np.float64), 255.0)
    assert thresholds_for("int8").psnr <= psnr < float("inf")


def test_export_cli_quantizes_an_existing_pair_without_torch(pair, tmp_path):
    """`export --checkpoint PAIR.onnx --cache-graphs --precision int8`: no re-export, runs with torch blocked."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        for _m in ("torch", "diffusers"):
            sys.modules[_m] = None
    """))
    out = tmp_path / "q.onnx"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "ditdeploy", "export", "--checkpoint", str(pair["fp32"]),
                        "--cache-graphs", "--precision", "int8", "--calibration", str(pair["calib"]), "--out",
                        str(out), "--no-progress"], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    m = json.loads(manifest_path(out).read_text())
    assert m["precision"] == "int8" and m["cache_graphs"]["light"] == "q.light.onnx"
    assert m["source"]["sha256"] == sha256_file(pair["fp32"])  # quantized from that very graph
    # a one-graph source with --cache-graphs: one line, nothing written
    from tests.conftest import assert_one_line_error, run_main

    plain = tmp_path / "plain"
    plain.mkdir()
    code, _, err = run_main(["export", "--checkpoint", str(out), "--precision", "int8", "--calibration",
                             str(pair["calib"]), "--out", str(plain / "x.onnx")])
    assert_one_line_error(code, err, "two-graph")
    assert list(plain.iterdir()) == []


# ---------------------------------------------------------------------------------------------- the chain (item 4)
class _Counting:
    def __init__(self, den):
        self.den, self.calls, self.rows = den, 0, 0
        self.config, self.name = den.config, den.name

    def __call__(self, x, t, y):
        self.calls += 1
        self.rows += x.shape[0]
        return self.den(x, t, y)


def test_calibrate_validation_budget_shared_batches_and_recorded_outputs(pair, tmp_path):
    from ditdeploy.calibration.capture import CaptureSettings, capture_calibration_set, load_calibration
    from ditdeploy.runtimes import load

    den = load(pair["fp32"])
    cfg = den.config  # a digits-sized model: extra validation trajectories always fit the work budget
    assert CaptureSettings(samples=1).resolved_val_samples(cfg) == 1
    assert CaptureSettings(samples=32).resolved_val_samples(cfg) == 8  # the old default where it was affordable
    assert CaptureSettings(samples=100).resolved_val_samples(cfg) == 8
    assert CaptureSettings(samples=5, val_samples=0).resolved_val_samples(cfg) == 0
    c = _Counting(den)
    out = tmp_path / "c.npz"
    capture_calibration_set(c, out, CaptureSettings(samples=1, steps=10), progress=False)
    # one calibration + one validation trajectory share each sampler call: 10 calls of 2 images x 2 halves
    assert (c.calls, c.rows) == (10, 40)
    cs = load_calibration(out)
    assert len(cs) == 20 and len(cs.val["x"]) == 20 and set(np.unique(cs.val["sample"])) == {0}
    # the recorded outputs are the model's own outputs on the recorded validation inputs
    ref = den(cs.val["x"], cs.val["t"], cs.val["y"])
    assert cs.val["out"].shape == ref.shape and np.abs(cs.val["out"] - ref).max() <= 1e-5
    # held out: no validation input equals a calibration input
    assert not any(np.array_equal(a, b) for a in cs.val["x"] for b in cs.x)


def test_int8_check_reuses_recorded_outputs(pair, tmp_path):
    """The INT8 check compares against the outputs calibrate recorded (same weights), and its numbers equal a fresh
    computation against the fp32 graph on ONNX Runtime."""
    from ditdeploy.calibration.capture import load_calibration
    from ditdeploy.calibration.report import error_curve
    from ditdeploy.runtimes.onnxruntime import make_session

    par = pair["manifest"]["parity"]
    assert par["reference"].startswith("fp32 outputs recorded by `calibrate`")
    v = load_calibration(pair["calib"]).val
    ref_s, q_s = make_session(pair["fp32"]), make_session(pair["int8"])
    fresh = error_curve(lambda x, t, y: ref_s.run(["out"], {"x": x, "t": t, "y": y})[0],
                        lambda x, t, y: q_s.run(["out"], {"x": x, "t": t, "y": y})[0],
                        v["x"], v["t"], v["y"], batch_size=8)["overall"]
    assert abs(fresh["cosine"] - par["cosine"]) < 1e-6 and abs(fresh["rel_l2"] - par["rel_l2"]) < 1e-5
