"""The training loop: real SIGKILL + resume gives the uninterrupted losses, disk-full keeps the previous checkpoint,
checkpoint contents are weights_only-loadable, precision / grad-checkpointing options, one-line CLI errors."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ditdeploy.cli import main as cli_main
from ditdeploy.training import state as ckstate

# A 1-block, 32-wide DiT on the digits preset's data; single thread so losses are bitwise reproducible.
TINY = ["--preset", "digits", "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--global-batch", "16",
        "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run_cli(*argv: str) -> None:
    """Run the CLI in-process; raises SystemExit on errors (like the console script)."""
    cli_main(["train", *argv])


def read_metrics(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out)]


def _cmd(out: Path, steps: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "ditdeploy", "train", *TINY, "--steps", str(steps), "--log-every", "1",
            "--out", str(out), *extra]


def _assert_checkpoints_clean(out: Path) -> None:
    """Every checkpoint under a final name loads (weights_only) and is complete."""
    for step, p in ckstate.list_checkpoints(out / "checkpoints"):
        ck = ckstate.load_checkpoint(p)
        assert ck["step"] == step


def _kill_and_resume(out: Path, steps: int, kills: int, seed: int, extra: list[str]) -> int:
    """Start, SIGKILL at ``kills`` random points (after a random number of new metric lines plus a random delay),
    resume each time, then let it finish. Returns how many kills landed before the run completed."""
    rnd = random.Random(seed)
    landed = 0
    for _ in range(kills + 1):
        resume = ["--resume", str(out)] if ckstate.list_checkpoints(out / "checkpoints") else []
        proc = subprocess.Popen(_cmd(out, steps, extra + resume), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if landed < kills:
            seen = len(read_metrics(out)) if (out / "metrics.jsonl").exists() else 0
            target = seen + rnd.randint(1, 4)
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline:
                try:
                    if len(read_metrics(out)) >= target:
                        break
                except (FileNotFoundError, json.JSONDecodeError):
                    pass
                time.sleep(0.01)
            time.sleep(rnd.uniform(0.0, 0.08))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                landed += 1
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        _assert_checkpoints_clean(out)
    assert proc.returncode == 0, err.decode()[-2000:]
    return landed


def _kill_resume_check(tmp_path: Path, steps: int, kills: int, seed: int) -> None:
    extra = ["--ckpt-every", "1", "--keep", "2"]
    ref = tmp_path / "ref"
    # The reference runs in its own process too, like the killed runs (same interpreter state for both).
    subprocess.run(_cmd(ref, steps, extra), check=True, stdout=subprocess.DEVNULL)
    killed = tmp_path / "killed"
    landed = _kill_and_resume(killed, steps, kills, seed, extra)
    assert landed >= min(kills, 1)
    a, b = losses(ref), losses(killed)
    assert [s for s, _ in b] == list(range(1, steps + 1))
    # same inputs, same weights, same optimizer state, single thread: identical losses (1e-6 allowed; 0 observed)
    for (sa, la), (sb, lb) in zip(a, b, strict=True):
        assert sa == sb and abs(la - lb) <= 1e-6, (sa, la, lb)
    ea, eb = ckstate.load_checkpoint(ckstate.resolve_resume(ref)), ckstate.load_checkpoint(ckstate.resolve_resume(killed))
    for k in ea["ema"]:
        torch.testing.assert_close(ea["ema"][k], eb["ema"][k], rtol=0, atol=1e-6)
    assert len(ckstate.list_checkpoints(killed / "checkpoints")) == 2  # keep=2
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.endswith(".tmp")]  # stale temps cleaned


def test_sigkill_and_resume_gives_the_uninterrupted_losses(tmp_path):
    _kill_resume_check(tmp_path, steps=16, kills=3, seed=0)


@pytest.mark.slow
def test_sigkill_at_twelve_random_points(tmp_path):
    _kill_resume_check(tmp_path, steps=40, kills=12, seed=1)


def test_disk_full_during_checkpoint_keeps_previous(tmp_path):
    out = tmp_path / "run"
    run_cli(*TINY, "--steps", "2", "--ckpt-every", "2", "--out", str(out))
    [(step, prev)] = ckstate.list_checkpoints(out / "checkpoints")
    before = prev.read_bytes()
    limit = len(before) // 2  # the next checkpoint (same size) cannot be written; small files still can

    def _limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(_cmd(out, 4, ["--ckpt-every", "2", "--resume", str(out)]), capture_output=True,
                          preexec_fn=_limit, timeout=300)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2, err
    assert err.startswith("error: could not write") and "previous checkpoint is intact" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert [s for s, _ in ckstate.list_checkpoints(out / "checkpoints")] == [2]
    assert prev.read_bytes() == before
    assert not [p for p in (out / "checkpoints").iterdir() if p.name != prev.name]  # no temp left behind
    assert ckstate.load_checkpoint(prev)["step"] == 2
    # and the run resumes normally once there is room again
    run_cli(*TINY, "--steps", "4", "--ckpt-every", "2", "--out", str(out), "--resume", str(out))
    assert [s for s, _ in losses(out)] == [2, 4]  # the failed attempt's lines past step 2 were dropped
    assert ckstate.load_checkpoint(ckstate.resolve_resume(out))["step"] == 4


def test_checkpoint_contents_are_plain_and_resumable(tmp_path):
    from ditdeploy.sources.checkpoints import load_model

    out = tmp_path / "run"
    run_cli(*TINY, "--steps", "6", "--ckpt-every", "2", "--keep", "2", "--log-every", "3", "--out", str(out))
    assert [s for s, _ in ckstate.list_checkpoints(out / "checkpoints")] == [4, 6]
    p = out / "checkpoints" / "0000006.pt"
    ck = torch.load(p, map_location="cpu", weights_only=True)  # plain data only
    assert {"model", "ema", "opt", "args", "config", "step", "rng", "data"} <= set(ck)
    assert ck["step"] == 6 and ck["args"]["global_batch"] == 16 and ck["config"]["hidden_size"] == 32
    assert ck["data"] == {"seed": 0, "num_items": 1500, "global_batch": 16, "epoch": 0, "batch_in_epoch": 6}
    assert isinstance(ck["rng"]["torch"], torch.Tensor)
    json.dumps(ck["args"])
    # the EMA export: safetensors with config metadata, loadable by name-checked loader, equal to the EMA entry
    m = load_model(out / "ema.safetensors")
    assert m.config.hidden_size == 32 and m.config.num_classes == 10 and m.config.space == "pixel"
    for k, v in m.state_dict().items():
        assert torch.equal(v, ck["ema"][k])
    # EMA moved away from the weights and from the init
    diff = [(ck["ema"][k] - ck["model"][k]).abs().max().item() for k in ck["model"] if k != "pos_embed"]
    assert max(diff) > 0
    rec = read_metrics(out)
    assert [r["step"] for r in rec] == [3, 6]
    assert {"loss", "mse", "vb", "lr", "steps_per_s", "samples_per_s", "epoch"} <= set(rec[0])
    assert abs(rec[0]["loss"] - rec[0]["mse"] - rec[0]["vb"]) < 1e-6
    # extending a finished run continues from its last checkpoint
    run_cli(*TINY, "--steps", "9", "--log-every", "3", "--ckpt-every", "3", "--out", str(out), "--resume", str(out))
    assert [r["step"] for r in read_metrics(out)] == [3, 6, 9]


def test_grad_checkpointing_gives_identical_losses(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli(*TINY, "--steps", "3", "--log-every", "1", "--out", str(a))
    run_cli(*TINY, "--steps", "3", "--log-every", "1", "--out", str(b), "--grad-checkpointing")
    assert losses(a) == losses(b)  # recomputation is the same arithmetic


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli(*TINY, "--steps", "3", "--log-every", "1", "--out", str(a))
    run_cli(*TINY, "--steps", "3", "--log-every", "1", "--out", str(b), "--precision", "bf16")
    la, lb = [x for _, x in losses(a)], [x for _, x in losses(b)]
    assert la != lb  # bf16 really ran
    for x, y in zip(la, lb, strict=True):
        assert abs(x - y) / x < 0.05  # bf16 matmuls: ~3 significant digits


def _err(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(*argv)
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert "unknown preset" in _err(capsys, "--preset", "mnist", "--out", out)
    assert "does not exist" in _err(capsys, "--data", str(tmp_path / "missing"), "--vae", str(tmp_path), "--out", out)
    (tmp_path / "empty").mkdir()
    assert "no class sub-folders" in _err(capsys, "--data", str(tmp_path / "empty"), "--vae", str(tmp_path), "--out", out)
    assert "needs --vae" in _err(capsys, "--data", str(tmp_path / "empty"), "--out", out)
    assert "nothing to train on" in _err(capsys, "--out", out)
    assert "--out DIR is required" in _err(capsys, "--preset", "digits")
    (tmp_path / "afile").write_text("x")
    assert "not writable" in _err(capsys, *TINY, "--steps", "1", "--out", str(tmp_path / "afile" / "run"))
    assert "fp16 needs a CUDA GPU" in _err(capsys, *TINY, "--steps", "1", "--precision", "fp16", "--out", out)
    assert "unknown --precision" in _err(capsys, *TINY, "--precision", "fp8", "--out", out)
    assert "fewer than --global-batch" in _err(capsys, *TINY, "--global-batch", "4096", "--out", out)
    assert "--steps must be positive" in _err(capsys, *TINY, "--steps", "0", "--out", out)
    assert "--ema-decay" in _err(capsys, *TINY, "--ema-decay", "1.5", "--out", out)
    # resume: missing, corrupt, truncated, foreign
    assert "does not exist" in _err(capsys, *TINY, "--out", out, "--resume", str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert "corrupt" in _err(capsys, *TINY, "--out", out, "--resume", str(bad))
    good = tmp_path / "g"
    run_cli(*TINY, "--steps", "1", "--out", str(good))
    ck = ckstate.resolve_resume(good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    assert "corrupt" in _err(capsys, *TINY, "--out", out, "--resume", str(trunc))
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    assert "not a ditdeploy training checkpoint" in _err(capsys, *TINY, "--out", out, "--resume", str(foreign))
    # resuming an older checkpoint while newer ones exist would fork the run's history
    run_cli(*TINY, "--steps", "2", "--ckpt-every", "1", "--out", str(good), "--resume", str(good))
    assert "newer than the resumed step 1" in _err(capsys, *TINY, "--steps", "3", "--out", str(good), "--resume",
                                                   str(good / "checkpoints" / "0000001.pt"))
    # a fresh run into a folder holding a run, and a resume that changes the recipe
    assert "--resume" in _err(capsys, *TINY, "--steps", "2", "--out", str(good))
    assert "differs from the resumed run" in _err(capsys, *TINY, "--steps", "2", "--lr", "0.5", "--out", str(good),
                                                  "--resume", str(good))


def test_malicious_pickle_resume_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, p)
    err = _err(capsys, *TINY, "--out", str(tmp_path / "o"), "--resume", str(p))
    assert "corrupt or not a ditdeploy training checkpoint" in err
    assert not marker.exists()


@pytest.mark.slow
def test_compile_gives_close_losses(tmp_path):
    # torch.compile (inductor, needs a C++ compiler) fuses kernels: same maths, different rounding
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli(*TINY, "--steps", "3", "--log-every", "1", "--out", str(a))
    run_cli(*TINY, "--steps", "3", "--log-every", "1", "--out", str(b), "--compile")
    for (_, x), (_, y) in zip(losses(a), losses(b), strict=True):
        assert abs(x - y) <= 1e-4 * abs(x)
