"""Calibration-set capture: both CFG halves, whole-trajectory timesteps, labels over all classes, held-out
validation seeds, manifest + sha256, atomic writes, the `ditdeploy calibrate` CLI; range estimators."""

from __future__ import annotations

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


@pytest.mark.parametrize("kw, msg", [
    (dict(steps=0), "steps"), (dict(samples=0), "samples"), (dict(sampler="euler"), "unknown sampler"),
    (dict(eta=0.5, sampler="ddpm"), "eta"), (dict(val_seed=0), "validation seed"),
])
def test_bad_settings(kw, msg):
    with pytest.raises(DitDeployError, match=msg):
        CaptureSettings(**kw).validate()


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
