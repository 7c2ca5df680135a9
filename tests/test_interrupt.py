"""SIGKILL during `ditdeploy export` and `ditdeploy calibrate` (issue 8): whatever instant the process dies, nothing
corrupt is ever *accepted* at the final path, and a plain rerun succeeds.

Kill points are of two kinds, both real SIGKILLs of the real CLI in a subprocess:

- after a delay (0.5 s, 1 s, 2 s; random delays over the whole run in the slow variant);
- at exact instants of the atomic write: a tiny wrapper makes the process SIGKILL *itself* when it is about to rename
  the finished file (or its manifest) onto the final path, i.e. the last moment before each rename. This hits the
  windows a timer almost never lands in.

After every kill: the final path is either absent, or the artifact loads through the normal loader with its manifest's
sha256 verified and computes what the reference computes, or the loader refuses it with a one-line ArtifactError
(an ONNX renamed into place whose manifest had not followed yet).

Training: tests/test_training_loop.py has kill/resume (3 kill points by default, 12 in its slow test) and disk-full
during a checkpoint write; here ten random SIGKILLs of real training processes run in the default suite, fast because
the processes are forked from a server that has imported torch once.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import KILL_BEFORE_RENAME

REPO = Path(__file__).resolve().parents[1]

# The child SIGKILLs itself right before os.replace(..., <target>) - the rename that publishes <target>.
def _env() -> dict[str, str]:
    env = {**os.environ, "DITDEPLOY_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("DITDEPLOY_DEBUG", None)
    return env


def _cmd(args: list) -> list[str]:
    return [sys.executable, "-m", "ditdeploy", *map(str, args)]


def run_and_kill_after(args: list, delay: float) -> int | None:
    """Start the CLI, SIGKILL it after ``delay`` seconds; returns its exit status (None if it was killed)."""
    proc = subprocess.Popen(_cmd(args), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        return None
    return proc.returncode


def run_killed_before_rename(args: list, target: Path) -> int:
    """Run the CLI in a child that SIGKILLs itself just before renaming a file onto ``target``."""
    r = subprocess.run([sys.executable, "-c", KILL_BEFORE_RENAME, str(target), *map(str, args)], cwd=REPO,
                       env=_env(), capture_output=True, timeout=600)
    return r.returncode


def run_ok(args: list) -> None:
    r = subprocess.run(_cmd(args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


# --------------------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 1-block, 32-wide digits-shaped DiT checkpoint (fast to export) and its torch model for reference outputs."""
    from ditdeploy.config.variants import DIGITS
    from ditdeploy.export.randomize import random_model
    from ditdeploy.sources.checkpoints import save_safetensors

    cfg = dataclasses.replace(DIGITS, hidden_size=32, depth=1, num_heads=2, variant="custom")
    model = random_model(cfg, seed=4)
    d = tmp_path_factory.mktemp("interrupt")
    return {"ckpt": save_safetensors(model, d / "tiny.safetensors", cfg), "model": model, "config": cfg}


def _reference_out(tiny) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    import torch

    cfg = tiny["config"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
    t = np.array([10, 900], np.int64)
    y = np.array([3, cfg.null_class], np.int64)
    with torch.no_grad():
        ref = tiny["model"](torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    return (x, t, y), ref


def assert_final_export_sound(final: Path, tiny) -> str:
    """The invariant after any kill. Returns 'absent', 'valid' or 'refused'."""
    from ditdeploy.errors import ArtifactError
    from ditdeploy.runtimes import load

    if not final.exists():
        return "absent"
    try:
        den = load(final)  # verifies the manifest's sha256 of every file
    except ArtifactError as e:
        assert "\n" not in str(e)
        return "refused"
    (x, t, y), ref = _reference_out(tiny)
    out = den(x, t, y)
    # fp32 ONNX vs torch fp32: ~1e-7 relative (measured at export); 1e-4 leaves room for thread-order differences
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-4
    return "valid"


def _visible(d: Path) -> list[str]:
    return sorted(p for p in os.listdir(d) if not p.startswith("."))


def test_export_sigkill_then_rerun(tiny, tmp_path):
    d = tmp_path / "out"
    final = d / "m.onnx"
    args = ["export", "--checkpoint", tiny["ckpt"], "--out", final]
    for delay in (0.5, 1.0, 2.0):  # early: interpreter start, imports, weights loading
        assert run_and_kill_after(args, delay) is None, "the export finished before the kill"
        assert assert_final_export_sound(final, tiny) == "absent"
    # the worst instant: the ONNX is renamed into place, its manifest is not yet
    assert run_killed_before_rename(args, final.with_name(final.name + ".json")) == -signal.SIGKILL
    assert _visible(d) == ["m.onnx"]
    assert assert_final_export_sound(final, tiny) == "refused"  # "no manifest beside it": never used half-made
    run_ok(args)  # a plain rerun replaces whatever was left
    assert _visible(d) == ["m.onnx", "m.onnx.json"]
    assert assert_final_export_sound(final, tiny) == "valid"


@pytest.mark.slow
def test_export_sigkill_over_an_existing_artifact(tiny, tmp_path):
    """Re-exporting over a good artifact: kills at random delays and before each rename never leave an accepted
    broken artifact; the old one stays usable until the new one is complete."""
    d = tmp_path / "out"
    final = d / "m.onnx"
    args = ["export", "--checkpoint", tiny["ckpt"], "--out", final]
    t0 = time.perf_counter()
    run_ok(args)
    full = time.perf_counter() - t0
    rnd = random.Random(8)
    seen = set()
    for delay in sorted(rnd.uniform(0.2, full) for _ in range(4)):
        run_and_kill_after(args, delay)
        seen.add(assert_final_export_sound(final, tiny))
    assert run_killed_before_rename(args, final) == -signal.SIGKILL
    assert assert_final_export_sound(final, tiny) == "valid"  # nothing renamed yet: the old artifact
    assert run_killed_before_rename(args, final.with_name(final.name + ".json")) == -signal.SIGKILL
    seen.add(assert_final_export_sound(final, tiny))  # new ONNX + old manifest: valid if byte-identical, else refused
    run_ok(args)
    assert assert_final_export_sound(final, tiny) == "valid"
    assert seen <= {"valid", "refused"}


# --------------------------------------------------------------------------------------------------------- calibrate
def assert_final_calibration_sound(final: Path) -> str:
    from ditdeploy.calibration.capture import load_calibration
    from ditdeploy.errors import ArtifactError

    if not final.exists():
        return "absent"
    try:
        cs = load_calibration(final)  # manifest + sha256 + array shapes + finiteness
    except ArtifactError as e:
        assert "\n" not in str(e)
        return "refused"
    assert len(cs) > 0 and cs.x.shape[1:] == (1, 8, 8) and np.isfinite(cs.x).all()
    return "valid"


def _calibrate_args(onnx_path: Path, final: Path) -> list:
    # 16 trajectories x 20 DDIM steps x 2 CFG halves of the digits model: a couple of seconds, a ~0.5 MB set
    return ["calibrate", "--engine", onnx_path, "--out", final, "--samples", "16", "--steps", "20", "--timesteps",
            "20", "--val-samples", "4", "--batch-size", "4"]


def test_calibrate_sigkill_then_rerun(digits_artifacts, tmp_path):
    d = tmp_path / "out"
    final = d / "calib.npz"
    args = _calibrate_args(digits_artifacts["onnx"], final)
    for delay in (0.5, 1.0, 2.0):  # on a fast machine the run may already be writing (or done) by then
        run_and_kill_after(args, delay)
        assert assert_final_calibration_sound(final) in ("absent", "valid", "refused")
    final.unlink(missing_ok=True)
    final.with_name(final.name + ".json").unlink(missing_ok=True)
    # exact instants: before the .npz is renamed into place, and between the .npz and its manifest
    assert run_killed_before_rename(args, final) == -signal.SIGKILL
    assert assert_final_calibration_sound(final) == "absent"
    assert run_killed_before_rename(args, final.with_name(final.name + ".json")) == -signal.SIGKILL
    assert _visible(d) == ["calib.npz"]
    assert assert_final_calibration_sound(final) == "refused"  # no manifest: refused, not half-trusted
    run_ok(args)
    assert assert_final_calibration_sound(final) == "valid"
    assert _visible(d) == ["calib.npz", "calib.npz.json"]


@pytest.mark.slow
def test_calibrate_sigkill_at_random_points(digits_artifacts, tmp_path):
    d = tmp_path / "out"
    final = d / "calib.npz"
    args = _calibrate_args(digits_artifacts["onnx"], final)
    t0 = time.perf_counter()
    run_ok(args)
    full = time.perf_counter() - t0
    rnd = random.Random(3)
    for delay in sorted(rnd.uniform(0.1, full * 1.1) for _ in range(10)):
        run_and_kill_after(args, delay)
        assert assert_final_calibration_sound(final) in ("valid", "refused")
    run_ok(args)
    assert assert_final_calibration_sound(final) == "valid"


# --------------------------------------------------------------------------------------------------------- train
TRAIN_TINY = ["--preset", "digits", "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--global-batch", "16",
              "--threads", "1", "--no-progress", "--log-every", "1", "--ckpt-every", "1", "--keep", "2"]
# what `ditdeploy train` imports (AdamW pulls torch._dynamo: ~5 s), imported once in the fork server
TRAIN_PRELOAD = ["torch", "torch._dynamo", "torch.optim", "ditdeploy.cli", "ditdeploy.training.loop",
                 "ditdeploy.training.data", "sklearn.datasets"]


def _train_child(argv: list[str]) -> None:
    """A training process: the real CLI entry point, output discarded (runs in a forked child)."""
    import threading

    import tqdm

    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    tqdm.tqdm.set_lock(threading.RLock())  # not a multiprocessing lock: a SIGKILL would leak its semaphore
    from ditdeploy.cli import main

    main(argv)


def _metrics(out: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_train_sigkill_at_ten_random_points(tmp_path):
    """Ten SIGKILLs at random points of a 60-step run (checkpoint every step), each followed by --resume: every
    final-named checkpoint always loads, and the resumed run's losses equal an uninterrupted run's. (60 steps: each
    attempt runs 1-3 steps plus a random delay before its kill, so 30 steps could end before the tenth kill landed.)"""
    from ditdeploy.training import state as ckstate

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(TRAIN_PRELOAD)
    steps = 60

    def start(out: Path, resume: bool):
        argv = ["train", *TRAIN_TINY, "--steps", str(steps), "--out", str(out)]
        p = ctx.Process(target=_train_child, args=(argv + (["--resume", str(out)] if resume else []),))
        p.start()
        return p

    ref = tmp_path / "ref"
    p = start(ref, False)
    p.join(300)
    assert p.exitcode == 0
    out = tmp_path / "killed"
    rnd = random.Random(2026)
    kills = 0
    for _ in range(40):
        p = start(out, bool(ckstate.list_checkpoints(out / "checkpoints")))
        if kills < 10:
            target = len(_metrics(out)) + rnd.randint(1, 3)  # let it make 1-3 new steps, then a random extra delay
            deadline = time.time() + 120
            while p.is_alive() and len(_metrics(out)) < target and time.time() < deadline:
                time.sleep(0.002)
            time.sleep(rnd.uniform(0.0, 0.03))
            if p.is_alive():
                p.kill()  # SIGKILL
                kills += 1
        p.join(300)
        if p.exitcode == 0:
            break
        assert p.exitcode == -signal.SIGKILL
        for step, ck in ckstate.list_checkpoints(out / "checkpoints"):  # nothing half-written under a final name
            assert ckstate.load_checkpoint(ck)["step"] == step
    assert p.exitcode == 0 and kills == 10
    a = [(r["step"], r["loss"]) for r in _metrics(ref)]
    b = [(r["step"], r["loss"]) for r in _metrics(out)]
    assert [s for s, _ in b] == list(range(1, steps + 1))
    # same data order, noise, weights and optimizer state, one thread: the same losses (0 difference observed)
    for (sa, la), (sb, lb) in zip(a, b, strict=True):
        assert sa == sb and abs(la - lb) <= 1e-6, (sa, la, lb)
