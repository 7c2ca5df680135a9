"""Calibration-set capture: both CFG halves, whole-trajectory timesteps, labels over all classes, held-out
validation seeds, manifest + sha256, atomic writes, the `ditdeploy calibrate` CLI; range estimators."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ditdeploy.artifact.files import manifest_path, sha256_file
from ditdeploy.calibration.capture import (
    VAL_SEED_OFFSET,
    CaptureSettings,
    capture_calibration_set,
    load_calibration,
    select_steps,
    spread_labels,
)
from ditdeploy.calibration.ranges import RangeHistogram, kl_threshold
from ditdeploy.diffusion import sampling_timesteps
from ditdeploy.errors import ArtifactError, DitDeployError

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def digits_denoiser():
    from ditdeploy.export.randomize import random_model
    from ditdeploy.runtimes.torch import TorchDenoiser

    return TorchDenoiser.from_model(random_model("digits", seed=3), threads=1)


SMALL = dict(samples=10, steps=30, timesteps=25, batch_size=8, val_samples=4, cfg_scale=4.0)


@pytest.fixture(scope="module")
def captured(digits_denoiser, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "calib.npz"
    m = capture_calibration_set(digits_denoiser, out, CaptureSettings(**SMALL), progress=False)
    return out, m, load_calibration(out)


# ---------------------------------------------------------------------------------------------- pure helpers

def test_spread_labels_cover_classes_evenly():
    y = spread_labels(25, 10, seed=1)
    counts = np.bincount(y, minlength=10)
    assert counts.min() == 2 and counts.max() == 3  # 25 over 10 classes: 2 or 3 each
    few = np.sort(spread_labels(4, 1000, seed=0))
    assert list(few) == [0, 250, 500, 750]  # evenly spaced over the class range
    assert np.array_equal(spread_labels(25, 10, seed=1), y)  # seeded order
    assert not np.array_equal(spread_labels(25, 10, seed=2), y)


def test_select_steps_even_and_inclusive():
    s = select_steps(50, 25)
    assert len(s) == 25 and s[0] == 0 and s[-1] == 49 and len(np.unique(s)) == 25
    assert np.all(np.diff(s) >= 1) and np.diff(s).max() - np.diff(s).min() <= 1
    assert list(select_steps(10, 25)) == list(range(10))
    s250 = select_steps(250, 32)
    assert len(np.unique(s250)) == 32 and s250[-1] == 249


# ---------------------------------------------------------------------------------------------- capture

def test_capture_both_halves_whole_trajectory(captured):
    out, m, cs = captured
    n_cond = SMALL["samples"] * SMALL["timesteps"]
    assert len(cs) == 2 * n_cond
    null = cs.manifest["config"]["num_classes"]
    uncond = cs.y == null
    assert int(uncond.sum()) == n_cond and m["counts"] == {
        "inputs": 2 * n_cond, "samples": SMALL["samples"], "timesteps": 25, "cond": n_cond, "uncond": n_cond}
    # each (trajectory, step) has a cond and an uncond entry sharing the same x_t and t
    for j in range(SMALL["samples"]):
        for k in np.unique(cs.step):
            sel = (cs.sample == j) & (cs.step == k)
            assert sel.sum() == 2 and uncond[sel].sum() == 1
            xs = cs.x[sel]
            assert np.array_equal(xs[0], xs[1]) and len(np.unique(cs.t[sel])) == 1
    # the kept timesteps are the sampler's own, spread from high noise to t = 0
    ts = sorted(np.asarray(sampling_timesteps("ddim", 30)).tolist())
    keep = select_steps(30, 25)
    expect = sorted({ts[::-1][i] for i in keep})
    assert sorted(int(t) for t in np.unique(cs.t)) == expect
    assert max(expect) == max(ts) and min(expect) == 0


def test_capture_labels_and_noise_contract(captured):
    _, m, cs = captured
    cond = cs.y != cs.manifest["config"]["num_classes"]
    labels = np.unique(cs.y[cond])
    assert list(labels) == list(range(10))  # 10 samples over 10 classes: each class once
    # the first kept call of batch 0 sees the initial noise x_T = default_rng([seed, 0]).standard_normal
    first = (cs.step == 0) & cond & (cs.sample < SMALL["batch_size"])
    order = np.argsort(cs.sample[first])
    noise = np.random.default_rng([0, 0]).standard_normal((SMALL["batch_size"], 1, 8, 8), dtype=np.float32)
    assert np.array_equal(cs.x[first][order], noise)


def test_manifest_and_validation_set(captured):
    out, m, cs = captured
    assert m["files"][out.name]["sha256"] == sha256_file(out) == cs.sha256
    assert sum(m["per_timestep"].values()) == len(cs)
    assert m["sampler"] == {"method": "ddim", "steps": 30, "cfg_scale": 4.0, "eta": 0.0,
                            "guide_all_channels": False}
    assert m["seed"] == 0 and m["kind"] == "calibration"
    v = cs.validation()
    assert m["validation"]["seed"] == VAL_SEED_OFFSET and m["validation"]["counts"]["inputs"] == len(v["x"])
    assert len(v["x"]) == 2 * SMALL["val_samples"] * 25
    # held out: other noise, so no validation input equals a calibration input
    first_val = v["x"][v["step"] == 0]
    first_cal = cs.x[cs.step == 0]
    assert not any(np.array_equal(a, b) for a in first_val for b in first_cal)


def test_corrupt_or_foreign_sets_are_refused(captured, tmp_path):
    out, _, _ = captured
    bad = tmp_path / "calib.npz"
    bad.write_bytes(out.read_bytes()[:-10] + b"0123456789")
    manifest_path(bad).write_text(manifest_path(out).read_text())
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_calibration(bad)
    with pytest.raises(ArtifactError, match="no such calibration set"):
        load_calibration(tmp_path / "nope.npz")


def test_no_guidance_captures_cond_only_and_separate_val_file(digits_denoiser, tmp_path):
    out, vout = tmp_path / "c.npz", tmp_path / "v.npz"
    s = CaptureSettings(samples=3, steps=5, timesteps=25, batch_size=4, val_samples=2, cfg_scale=1.0, seed=5)
    m = capture_calibration_set(digits_denoiser, out, s, val_out=vout, progress=False)
    assert m["counts"]["uncond"] == 0 and m["counts"]["inputs"] == 3 * 5
    assert "warning" in m  # fewer than 25 timesteps on the trajectory
    cs = load_calibration(out)
    assert cs.val is not None and len(cs.val["x"]) == 2 * 5
    vm = json.loads(manifest_path(vout).read_text())
    assert vm["role"] == "validation" and vm["seed"] == 5 + VAL_SEED_OFFSET


def test_failure_leaves_nothing_at_the_final_path(digits_denoiser, tmp_path):
    calls = {"n": 0}

    class Failing:
        config = digits_denoiser.config
        name = "failing"

        def __call__(self, x, t, y):
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("device lost")
            return digits_denoiser(x, t, y)

    out = tmp_path / "c.npz"
    with pytest.raises(RuntimeError):
        capture_calibration_set(Failing(), out, CaptureSettings(samples=2, steps=10, val_samples=0), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_work_budget_resolves_trajectories_per_model():
    """Default --samples: as many trajectories as fit the work budget (MACs, not seconds), 1..32; the validation
    rides on the unkept calls where extra trajectories do not fit; an explicit --samples is kept."""
    from ditdeploy.calibration.capture import BUDGET_MACS, VAL_TRAJECTORIES, VAL_UNKEPT
    from ditdeploy.config.macs import full_macs
    from ditdeploy.config.variants import DIGITS, variant_config

    xl2, s2 = variant_config("XL/2", image_size=256), variant_config("S/2", image_size=256)
    p = CaptureSettings().plan(DIGITS)  # the digits model: the old defaults, 32 + 8 validation trajectories
    assert (p.samples, p.val_samples, p.val_source, p.samples_from) == (32, 8, VAL_TRAJECTORIES, "budget")
    assert p.trajectory_macs == 50 * 2 * full_macs(DIGITS)  # 50 DDIM calls of 2 rows (cfg 4: both halves)
    p = CaptureSettings().plan(xl2)  # XL/2 256, 50 guided steps: 11.9 T each -> 1, validated on its unkept calls
    assert (p.samples, p.val_samples, p.val_source) == (1, 0, VAL_UNKEPT)
    assert p.record()["spent_macs"] == p.trajectory_macs <= BUDGET_MACS
    assert CaptureSettings().plan(s2).samples == 32  # 0.61 T each: still 32
    p = CaptureSettings(samples=2).plan(xl2)  # explicit: kept as given (over the budget), validation still free
    assert (p.samples, p.val_samples, p.val_source, p.samples_from) == (2, 0, VAL_UNKEPT, "--samples")
    assert CaptureSettings(samples=2, val_samples=3).plan(xl2).val_samples == 3  # explicit validation kept
    # --steps <= --timesteps: every call is kept, so the validation needs extra trajectories; both fit the budget
    p = CaptureSettings(steps=25).plan(xl2)
    assert (p.samples, p.val_samples, p.val_source) == (2, 1, VAL_TRAJECTORIES)
    assert p.record()["spent_macs"] == 3 * 25 * 2 * full_macs(xl2) <= BUDGET_MACS
    p = CaptureSettings(steps=25, cfg_scale=1.0).plan(xl2)  # one row per call: 6 fit, 4 + a quarter of 4 validate
    assert (p.samples, p.val_samples) == (4, 1)


def test_unkept_calls_are_a_free_validation_set(digits_denoiser, tmp_path):
    """With no room for extra trajectories the validation set is the trajectories' unkept calls: exactly the
    inputs of the steps --timesteps left out, disjoint from the calibration rows, their recorded outputs equal to an
    independent run of the model, and not one denoiser call more than the calibration alone."""
    from ditdeploy.calibration.capture import capture_inputs

    class Counting:
        config, name = digits_denoiser.config, "counting"
        calls = rows = 0

        def __call__(self, x, t, y):
            Counting.calls += 1
            Counting.rows += x.shape[0]
            return digits_denoiser(x, t, y)

    steps, keep, n = 12, 5, 3
    s = CaptureSettings(steps=steps, timesteps=keep, batch_size=4, seed=2, budget_macs=1.0)  # room for 1 only
    m = capture_calibration_set(Counting(), tmp_path / "c.npz", s, progress=False)
    assert m["budget"]["samples"] == 1 and m["validation"]["source"].startswith("unkept calls")
    assert (Counting.calls, Counting.rows) == (steps, steps * 2)  # one trajectory, both halves, nothing extra
    cs = load_calibration(tmp_path / "c.npz")
    v = cs.validation()
    kept = set(select_steps(steps, keep).tolist())
    assert set(cs.step.tolist()) == kept and set(v["step"].tolist()) == set(range(steps)) - kept
    assert len(v["x"]) == (steps - keep) * 2 and m["validation"]["seed"] == s.seed
    # an independent capture that keeps every call of the same trajectory: calibration + validation = all of it
    full = capture_inputs(digits_denoiser, digits_denoiser.config, samples=1, seed=2, steps=steps, timesteps=steps,
                          batch_size=4)
    for part in (cs.validation(), {"x": cs.x, "t": cs.t, "y": cs.y, "step": cs.step}):
        for i in range(len(part["x"])):
            j = np.flatnonzero((full["step"] == part["step"][i]) & (full["y"] == part["y"][i]))
            assert j.size == 1 and np.array_equal(full["x"][j[0]], part["x"][i]) and full["t"][j[0]] == part["t"][i]
    ref = digits_denoiser(v["x"], v["t"], v["y"])
    assert np.abs(v["out"] - ref).max() <= 1e-5  # fp32 batch-composition noise only
    # an explicit --samples with the same budget: 3 trajectories, still validated on their own unkept calls
    Counting.calls = Counting.rows = 0
    m = capture_calibration_set(Counting(), tmp_path / "d.npz", dataclasses.replace(s, samples=n), progress=False)
    assert m["budget"]["samples_from"] == "--samples" and m["validation"]["counts"]["inputs"] == n * (steps - keep) * 2
    assert (Counting.calls, Counting.rows) == (steps, steps * 2 * n)


@pytest.mark.parametrize("kw, msg", [
    (dict(steps=0), "steps"), (dict(samples=0), "samples"), (dict(sampler="euler"), "unknown sampler"),
    (dict(eta=0.5, sampler="ddpm"), "eta"), (dict(val_seed=0, val_samples=2), "validation seed"),
])
def test_bad_settings(kw, msg):
    with pytest.raises(DitDeployError, match=msg):
        CaptureSettings(**kw).validate()


def test_val_seed_equal_to_seed_only_refused_where_validation_draws_noise():
    """--val-seed equal to --seed: refused for validation trajectories (the same noise is no held-out set), accepted
    where the validation is the unkept calls (no noise drawn) or there is none."""
    from ditdeploy.calibration.capture import VAL_TRAJECTORIES, VAL_UNKEPT
    from ditdeploy.config.variants import DIGITS, variant_config

    same = CaptureSettings(val_seed=0)
    same.validate()  # the source is only known once the model is: not refused early
    assert same.plan(DIGITS).val_source == VAL_TRAJECTORIES
    with pytest.raises(DitDeployError, match="validation seed"):
        same.check_seeds(same.plan(DIGITS).val_source)
    xl2 = variant_config("XL/2", image_size=256)
    assert same.plan(xl2).val_source == VAL_UNKEPT
    same.check_seeds(same.plan(xl2).val_source)  # no noise drawn: accepted
    CaptureSettings(val_seed=0, val_samples=0).validate()


def test_calibrate_cli(digits_denoiser, tmp_path, capsys):
    from ditdeploy.cli import main
    from ditdeploy.sources.checkpoints import save_safetensors

    ckpt = tmp_path / "digits.safetensors"
    save_safetensors(digits_denoiser.model, ckpt, digits_denoiser.config)
    out = tmp_path / "cli.npz"
    main(["calibrate", "--engine", str(ckpt), "--samples", "4", "--steps", "25", "--val-samples", "2",
          "--batch-size", "4", "--out", str(out)])
    assert "200 inputs (100 cond + 100 uncond)" in capsys.readouterr().out  # cfg 4 by default: both halves
    m = json.loads(manifest_path(out).read_text())
    assert m["counts"]["cond"] == m["counts"]["uncond"] == 4 * 25
    assert m["source"]["sha256"] == sha256_file(ckpt) and m["source"]["backend"].startswith("torch")
    for argv, frag in ((["--steps", "0"], "--steps"), (["--out", str(tmp_path / "x.txt")], ".npz"),
                       (["--sampler", "heun"], "'heun' is not one of")):
        with pytest.raises(SystemExit) as e:
            main(["calibrate", "--engine", str(ckpt), "--out", str(tmp_path / "e.npz"), *argv])
        assert e.value.code != 0
        err = capsys.readouterr().err.strip()
        assert frag in err and "\n" not in err and err.startswith("error:")


# ---------------------------------------------------------------------------------------------- range estimators

def test_percentile_matches_numpy_within_a_bin():
    rng = np.random.default_rng(0)
    h = RangeHistogram(2048)
    parts = [rng.standard_normal((200, 500)).astype(np.float32) * (1 + 0.5 * i) + 0.3 * (i % 2) for i in range(6)]
    for p in parts:  # the range doubles as later batches grow: counts must be preserved
        h.add(p)
    allv = np.concatenate([p.ravel() for p in parts])
    lo, hi = h.percentile(99.99)
    assert abs(hi - np.percentile(np.abs(allv), 99.99)) <= 2 * h.width and lo == -hi
    lo, hi = h.percentile(99.9, symmetric=False)
    ref = np.percentile(allv, [0.05, 99.95])
    assert abs(lo - ref[0]) <= 2 * h.width and abs(hi - ref[1]) <= 2 * h.width
    assert h.minmax(symmetric=False) == (float(allv.min()), float(allv.max()))
    assert h.count == allv.size and h.hist.sum() == allv.size


def test_entropy_threshold_clips_outliers():
    rng = np.random.default_rng(1)
    h = RangeHistogram(2048)
    g = rng.standard_normal(1_000_000).astype(np.float32)
    g[:10] = 40.0  # rare outliers stretch the max 8x
    h.add(g)
    lo, hi = h.entropy()
    assert 2.5 < hi < 8.0 and lo == -hi  # KL keeps the Gaussian body, drops the outliers
    assert kl_threshold(np.ones(64), 128) == 64  # fewer bins than levels: keep all
