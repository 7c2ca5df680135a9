"""DDP: `torchrun --nproc_per_node 2` (gloo, CPU) trains the same model as one process with the whole global batch,
and both ranks end with bitwise identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ditdeploy.training import state as ckstate

TINY = ["--preset", "digits", "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--global-batch", "16",
        "--threads", "1", "--no-progress", "--log-every", "1"]


def test_two_rank_ddp_matches_global_batch(tmp_path):
    steps = "4"
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "ditdeploy", "train", *TINY, "--device", "cpu", "--steps", steps, "--out", str(ddp)],
        capture_output=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    subprocess.run([sys.executable, "-m", "ditdeploy", "train", *TINY, "--device", "cpu", "--steps", steps, "--out",
                    str(single)],
                   check=True, capture_output=True, env=env, timeout=600)

    # both replicas hold exactly the same weights and EMA
    r0 = json.loads((ddp / "ranks" / "rank0.json").read_text())
    r1 = json.loads((ddp / "ranks" / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2 and r0["step"] == 4
    assert r0["model_sha256"] == r1["model_sha256"] and r0["ema_sha256"] == r1["ema_sha256"]

    # global-batch semantics: 2 x 8 per rank == 1 x 16 (same samples, noise, t, dropout; mean over 16)
    a = ckstate.load_checkpoint(ckstate.resolve_resume(ddp))
    b = ckstate.load_checkpoint(ckstate.resolve_resume(single))
    assert a["world_size"] == 2 and b["world_size"] == 1
    worst = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    # only the summation order of the gradient differs (all-reduce of two half-batch means vs one mean): fp32
    # rounding, amplified a little by Adam's normalisation over 4 steps of lr 1e-3
    assert worst < 1e-5, worst
    la = [json.loads(x)["loss"] for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (single / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 4
    for x, y in zip(la, lb, strict=True):
        assert abs(x - y) < 1e-5 * max(1.0, abs(y))
    # and the weights did move (the comparison is not between two untouched inits)
    init_gap = max((a["model"][k] - a["ema"][k]).abs().max().item() for k in a["model"])
    assert init_gap > 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nccl + fp16 GradScaler)")
def test_fp16_gradscaler_on_gpu(tmp_path):
    out = tmp_path / "gpu"
    subprocess.run([sys.executable, "-m", "ditdeploy", "train", *TINY, "--steps", "4", "--precision", "fp16",
                    "--device", "cuda", "--out", str(out)], check=True, timeout=600)
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("grad_scale" in r and r["loss"] == r["loss"] for r in rec)
