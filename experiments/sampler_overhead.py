"""Sampler overhead of ``ditdeploy sample``'s loop: the share of wall time NOT spent inside denoiser calls.

DiT-S/2 at 256 px (32x32x4 latents, random weights: speed only), exported to ONNX and run on ONNX Runtime CPU
(or ``--backend torch``). For each sampler it runs the exact loop ``ditdeploy sample`` runs — per-image initial
noise from (seed, index), ``diffusion.sample`` with classifier-free guidance (2B-batch denoiser calls), per-image
step noise — with the denoiser wrapped in ``runtimes.Timed``, and reports

    overhead = wall(sampling loop) - time inside denoiser calls,   share = overhead / wall.

VAE decoding is excluded by definition (it is a model call, like the denoiser). Run::

    python3 experiments/sampler_overhead.py            # -> bench/results/sampler_overhead.json

The JSON holds every raw timing, the machine, and the load average during the run (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUNS = (("ddim", 50), ("dpm-solver++", 25), ("ddpm", 250))


def _onnx_denoiser(variant: str, image_size: int, cache: Path, threads: int | None):
    """S/2 random-weight ONNX in ``cache`` (exported once with ditdeploy.export), loaded on ORT CPU."""
    from ditdeploy.runtimes import load

    onnx = cache / f"{variant.replace('/', '')}_{image_size}.onnx"
    if not onnx.exists():
        from ditdeploy.export.onnx import export_denoiser_onnx
        from ditdeploy.export.randomize import random_model

        export_denoiser_onnx(random_model(variant, image_size=image_size, seed=0), onnx)
    return load(onnx, backend="onnxruntime", threads=threads)


def _torch_denoiser(variant: str, image_size: int, threads: int | None):
    from ditdeploy.export.randomize import random_model
    from ditdeploy.runtimes.torch import TorchDenoiser

    return TorchDenoiser(random_model(variant, image_size=image_size, seed=0), threads=threads)


def measure(den, method: str, steps: int, images: int, cfg_scale: float, seed: int = 0,
            progress: bool = False) -> dict:
    """One sampling run of ``images`` images the way ``ditdeploy sample`` does it; raw timings."""
    from ditdeploy.diffusion import sample
    from ditdeploy.run import noise_contract
    from ditdeploy.runtimes import Timed

    cfg = den.config
    idx = np.arange(images)
    labels = idx % cfg.num_classes
    timed = Timed(den)
    t0 = time.perf_counter()
    noise = noise_contract.initial_noise(seed, idx, (cfg.in_channels, cfg.input_size, cfg.input_size))
    sample(timed, noise, labels, method=method, steps=steps, cfg_scale=cfg_scale, num_classes=cfg.num_classes,
           noise_fn=noise_contract.PerImageNoise(seed, idx), progress=progress)
    wall = time.perf_counter() - t0
    over = wall - timed.seconds
    return {"method": method, "steps": steps, "images": images, "cfg_scale": cfg_scale, "progress_bar": progress,
            "wall_s": wall, "denoiser_s": timed.seconds, "denoiser_calls": timed.calls,
            "denoiser_batch": timed.rows // max(timed.calls, 1), "overhead_s": over,
            "overhead_pct": 100.0 * over / wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="S/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime")
    ap.add_argument("--images", type=int, default=2, help="images per run (denoiser batch = 2x with cfg)")
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", default=",".join(f"{m}:{s}" for m, s in RUNS), help="method:steps,…")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ditdeploy-bench")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "bench" / "results" / "sampler_overhead.json")
    a = ap.parse_args(argv)
    a.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    den = (_onnx_denoiser(a.variant, a.image_size, a.cache, a.threads) if a.backend == "onnxruntime"
           else _torch_denoiser(a.variant, a.image_size, a.threads))
    setup = time.perf_counter() - t0
    den(*_warm(den))  # first call pays one-time allocations
    rows = []
    for spec in a.runs.split(","):
        m, s = spec.split(":")
        for progress in (False, True):
            r = measure(den, m, int(s), a.images, a.cfg_scale, progress=progress)
            r["loadavg_1m_after"] = os.getloadavg()[0]
            rows.append(r)
            print(f"{m:13s} {int(s):4d} steps  bar={progress!s:5s}  wall {r['wall_s']:7.2f} s  denoiser "
                  f"{r['denoiser_s']:7.2f} s  overhead {r['overhead_s'] * 1e3:7.1f} ms = {r['overhead_pct']:.3f}%",
                  file=sys.stderr)
    from ditdeploy.artifact.files import tool_versions, write_json_atomic
    from ditdeploy.bench.machine import machine_info

    result = {
        "what": "sampler overhead = sampling-loop wall time not spent in denoiser calls (ditdeploy sample's loop)",
        "model": {"variant": a.variant, "image_size": a.image_size, "weights": "random (speed only)"},
        "backend": den.name, "threads": a.threads, "setup_s": setup, "runs": rows,
        "max_overhead_pct": max(r["overhead_pct"] for r in rows),
        "machine": {**machine_info(), "platform": platform.platform(), "loadavg_at_end": os.getloadavg()},
        "tools": tool_versions(),
        "command": "python3 experiments/sampler_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_json_atomic(a.out, result)
    print(f"max overhead {result['max_overhead_pct']:.3f}% -> {a.out}", file=sys.stderr)
    return 0


def _warm(den):
    c = den.config
    return (np.zeros((2, c.in_channels, c.input_size, c.input_size), np.float32), np.array([1, 500]),
            np.array([0, c.num_classes]))


if __name__ == "__main__":
    sys.exit(main())
