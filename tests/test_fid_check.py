"""`ditdeploy check --fid-ref`: the artifact and its torch reference sample the same seeds and are scored against one
reference; the FID delta is reported (issue 16, deliverable 4).

Independent check: an fp32 ONNX export computes what torch computes, so on the same seeds the two sample sets are
(nearly) the same images: their FIDs agree and the FID between them is ~0, while two sample sets with different
seeds are far apart (so the ~0 is not automatic).
"""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error, run_main

FAST = ["--steps", "2", "--batch-size", "1", "--timesteps", "2", "--cfg-scale", "1"]


def test_check_fid_ref_digits_fp32(digits_artifacts, tmp_path):
    out = tmp_path / "check.json"
    code, stdout, err = run_main(["check", "--engine", digits_artifacts["onnx"], "--reference",
                                  digits_artifacts["ckpt"], *FAST, "--fid-ref", "digits", "--fid-samples", "40",
                                  "--json", out])
    assert code == 0, err[-3000:]
    fid = json.loads(out.read_text())["fid"]
    assert fid["images"] == 40 and fid["fid_ref"] == "digits" and fid["steps"] == 2
    assert fid["extractor"]["name"] == "digits-mlp-v1"
    a, r = fid["artifact"]["metrics"]["fid"], fid["reference"]["metrics"]["fid"]
    assert fid["fid_delta"] == pytest.approx(a - r)
    assert abs(fid["fid_delta"]) < 1e-2 * r  # fp32 artifact vs torch fp32, same seeds: same images up to rounding
    assert fid["fid_artifact_vs_reference_samples"] < 1e-3
    assert fid["reference"]["backend"].startswith("torch") and fid["artifact"]["backend"].startswith("onnxruntime")
    assert "delta" in stdout


def test_same_model_other_seeds_is_far(digits_artifacts, tmp_path):
    """The control for the ~0 above: the same model with other seeds gives a clearly non-zero FID between sets."""
    from ditdeploy.fid import FidRequest, evaluate
    from ditdeploy.run.generation import SampleRequest, generate

    npz = []
    for seed in (0, 1):
        p = tmp_path / f"s{seed}.npz"
        generate(SampleRequest(engine=digits_artifacts["onnx"], num_per_label=4, steps=2, cfg_scale=1.0, seed=seed,
                               out=None, npz=p))
        npz.append(p)
    rep = evaluate(FidRequest(samples=npz[0], ref=npz[1], extractor="digits", precision_recall=False,
                              progress=False))
    assert rep["metrics"]["fid"] > 1e-2


def test_fid_ref_bad_combinations(digits_artifacts, tmp_path):
    code, _, err = run_main(["check", "--golden", tmp_path / "g.npz", "--engine", digits_artifacts["onnx"],
                             "--fid-ref", "digits"])
    assert_one_line_error(code, err, ["--fid-ref", "--golden"])
    code, _, err = run_main(["check", "--engine", digits_artifacts["onnx"], "--fid-ref", "digits",
                             "--fid-samples", "1"])
    assert_one_line_error(code, err, ["--fid-samples"])
