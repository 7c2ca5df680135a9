"""`ditdeploy tune` and recipes (#24 item 3) on the shipped digits model with tiny settings: the pick really meets
the budget and is the fastest row that does, the quality numbers equal independent computations, an interrupted
run resumes from its state file reusing every measured row, and `sample --recipe` runs exactly the picked recipe."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tests.conftest import assert_one_line_error, run_main

pytest.importorskip("onnxruntime.quantization")

SMALL = dict(backends=["onnxruntime"], less_work=["full", "interval"], threads=[1], steps=10, images=4,
             rounds=2, fid_samples=100)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The shipped digits ONNX (fp32) and its dynamic INT8 export."""
    from ditdeploy.calibration.quantize import quantize_int8
    from tests.conftest import shipped_digits_copy

    d = tmp_path_factory.mktemp("tune")
    fp32 = shipped_digits_copy(d)
    q = d / "digits-int8dyn.onnx"
    quantize_int8(fp32, q, mode="dynamic", progress=False)
    return d, fp32, q


@pytest.fixture(scope="module")
def tuned(engines):
    from ditdeploy.proof.tuner import TuneRequest, tune

    d, fp32, q = engines
    req = TuneRequest(engines=[fp32, q], state=d / "state.json", **SMALL)
    return req, tune(req)


def test_pick_meets_the_budget_and_is_the_fastest_that_does(tuned):
    req, res = tuned
    rows = res["rows"]
    assert len(rows) == 4 and sum(r["picked"] for r in rows) == 1
    b = res["budget"]
    assert b == {"min_call_cosine": 0.99, "max_fid_delta": 0.1, "max_drift_rel_l2": None}
    for r in rows:  # the flag agrees with the numbers
        ok = r["call_cosine_min"] >= 0.99 and r["fid_delta"] <= 0.1
        assert r["within_budget"] == (ok or r["key"] == res["reference"])
        assert len(r["times_s"]) == 2 and r["median_s"] == pytest.approx(float(np.median(r["times_s"])))
    pick = res["pick"]
    assert pick["within_budget"] and pick["fid_delta"] <= 0.1 and pick["call_cosine_min"] >= 0.99
    assert pick["median_s"] == min(r["median_s"] for r in rows if r["within_budget"])
    int8 = [r for r in rows if "int8" in r["engine"]]
    assert all(0.99 <= r["call_cosine_min"] < 1.0 for r in int8)  # priced, and not a copy of fp32
    ref = next(r for r in rows if r["key"] == res["reference"])
    assert ref["drift"]["rel_l2"] == 0.0 and ref["fid_delta"] == 0.0
    assert res["machine"]["cpu_isa"]["flags"] == res["machine"]["flags"] and res["machine"]["load_avg_1_5_15"]


def test_quality_numbers_equal_an_independent_computation(tuned, engines):
    """Drift and FID of the interval row from plain generate + fid.evaluate runs with the same settings."""
    from ditdeploy.fid.evaluate import DIGITS_REF, FidRequest, evaluate
    from ditdeploy.proof import distances
    from ditdeploy.run.generation import SampleRequest, generate

    req, res = tuned
    d, fp32, _ = engines
    row = next(r for r in res["rows"] if r["engine"] == str(fp32) and r["less_work"] == "interval")
    base = SampleRequest(engine=fp32, backend="onnxruntime", options={"threads": 1}, labels=[0, 1, 2, 3],
                         steps=10, out=None)
    full = generate(base).latents
    less = generate(dataclasses.replace(base, cfg_interval=[150, 750])).latents
    assert row["drift"]["rel_l2"] == pytest.approx(distances.rel_l2(less, full), rel=1e-6)
    assert 0 < row["drift"]["rel_l2"] < 1
    npz = d / "fid.npz"
    generate(dataclasses.replace(base, labels=[i % 10 for i in range(100)], cfg_interval=[150, 750], npz=npz))
    fid = evaluate(FidRequest(samples=npz, ref=DIGITS_REF, progress=False, precision_recall=False))["metrics"]["fid"]
    assert row["fid"] == pytest.approx(fid, rel=1e-9)


def test_interrupted_run_resumes_reusing_measured_rows(engines, tmp_path):
    from ditdeploy.proof.tuner import TuneRequest, tune

    _, fp32, q = engines
    req = TuneRequest(engines=[fp32, q], state=tmp_path / "s.json", **{**SMALL, "fid_samples": 20})
    seen: list[str] = []

    def stop_after_three(key: str) -> None:
        seen.append(key)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(req, on_run=stop_after_three)
    saved = json.loads((tmp_path / "s.json").read_text())["rows"]
    done = {k: v["times"] for k, v in saved.items() if v["times"]}
    assert sum(len(v) for v in done.values()) == 3
    again: list[str] = []
    res = tune(req, on_run=again.append)
    assert res["resumed_runs"] == 3 and len(again) == 4 * 2 - 3  # only the missing runs were measured
    for r in res["rows"]:
        if r["key"] in done:
            assert r["times_s"][:len(done[r["key"]])] == done[r["key"]]


def test_recipe_round_trip_and_sample_recipe(tuned, engines, tmp_path):
    from ditdeploy.proof.tuner import recipe_of
    from ditdeploy.run.generation import SampleRequest, generate
    from ditdeploy.run.recipes import apply_recipe, load_recipe, save_recipe

    _, res = tuned
    d, _, _ = engines
    path = d / "recipe.json"
    save_recipe(path, recipe_of(res, path))
    r = load_recipe(path)
    p = res["pick"]
    assert (r.backend, r.options["threads"], r.measured["median_s"]) == (p["backend"], 1, p["median_s"])
    assert r.machine["flags"] == res["machine"]["flags"]
    req = apply_recipe(SampleRequest(out=None, labels=[3, 7], steps=10), path)
    assert req.engine.resolve() == d.joinpath(r.engine).resolve() and req.backend == p["backend"]
    assert req.cfg_interval == ([150, 750] if "interval" in p["less_work"] else None)
    # explicit settings win over the recipe
    assert apply_recipe(SampleRequest(out=None, cfg_interval=[0, 999]), path).cfg_interval == [0, 999]
    # the CLI runs exactly that request
    npz = tmp_path / "s.npz"
    code, _, err = run_main(["sample", "--recipe", str(path), "--labels", "3,7", "--steps", "10", "--no-out",
                             "--npz", str(npz), "--no-progress"])
    assert code == 0, err
    want = generate(dataclasses.replace(req, npz=None)).images
    with np.load(npz) as z:
        assert np.array_equal(z["arr_0"], want)
    # a broken recipe is one line
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(path.read_text()), "cache_interval": 0}))
    code, _, err = run_main(["sample", "--recipe", str(bad), "--no-out", "--npz", str(tmp_path / "x.npz")])
    assert_one_line_error(code, err, "cache_interval")


def test_tune_cli_writes_recipe_table_and_plot(engines, tmp_path):
    pytest.importorskip("matplotlib")
    _, fp32, _ = engines
    out = tmp_path / "r.json"
    code, stdout, err = run_main(["tune", "--engine", str(fp32), "--backends", "onnxruntime", "--threads", "1",
                                  "--less-work", "full,interval", "--steps", "5", "--images", "2", "--rounds", "1",
                                  "--no-fid", "--out", str(out), "--plot", str(tmp_path / "p.png"), "--no-progress"])
    assert code == 0, err
    assert "budget: call cosine >= 0.99, drift rel-L2 <= 0.2" in stdout and "wrote recipe" in stdout
    assert json.loads(out.read_text())["kind"] == "ditdeploy-recipe"
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_main(["tune", "--engine", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "y.json")])
    assert_one_line_error(code, err, "missing.onnx")


def test_recipe_fills_serve_options_and_server_requests(tuned, engines):
    """`serve --recipe` takes the artifact, backend and options; a request to a server only the less-work settings
    (the server chose its artifact)."""
    from ditdeploy.proof.tuner import recipe_of
    from ditdeploy.run.generation import SampleRequest
    from ditdeploy.run.recipes import apply_recipe, save_recipe
    from ditdeploy.serving.options import ServeOptions

    _, res = tuned
    d, _, _ = engines
    path = d / "recipe-serve.json"
    save_recipe(path, recipe_of(res, path))
    p = res["pick"]
    so = apply_recipe(ServeOptions(options={"threads": None}), path)
    assert str(so.engine.resolve()) == str(type(so.engine)(p["engine"]).resolve()) and so.backend == p["backend"] and so.options["threads"] == 1
    assert apply_recipe(ServeOptions(backend="openvino"), path).backend == "openvino"  # explicit wins
    sr = apply_recipe(SampleRequest(out=None, server="http://127.0.0.1:1"), path)
    assert sr.engine is None and sr.backend is None
    assert sr.cfg_interval == ([150, 750] if "interval" in p["less_work"] else None)
