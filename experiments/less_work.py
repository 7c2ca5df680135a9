"""Less work per image on the shipped digits model: every reduced-work option against full work, same seeds.

Options (``OPTIONS``): limited-interval guidance (``cfg_interval``), feature reuse (``cache_interval``) and their
combination. For each: the denoiser work actually done (rows, light rows, GMACs from ``ditdeploy.config.macs``), CPU and wall
seconds of sampling, and quality: class accuracy of the samples by the project's digits classifier (the SVC of
``experiments/digits_quality.py``), within-class spread (per-pixel std and pairwise L2, as ratios to real held-out digits),
and PSNR against the full-work samples from the same seeds (pixels 0..255). Guidance intervals change the samples
by design (judge them by accuracy and spread); feature reuse approximates the same trajectory (PSNR applies).

Run: ``python -m experiments.less_work [--n-per-class 12] [--method ddim] [--steps 50] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

# (name, cfg_interval, cache_interval)
OPTIONS: tuple[tuple[str, list[int] | None, int | None], ...] = (
    ("full", None, None),
    ("interval 150..750", [150, 750], None),
    ("cache 2", None, 2),
    ("cache 3", None, 3),
    ("interval 150..750 + cache 2", [150, 750], 2),
    ("interval 150..750 + cache 3", [150, 750], 3),
)
RECOMMENDED = ("interval 150..750 + cache 2", [150, 750], 2)  # documented in docs/less-work.md


def psnr_255(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of images in [-1, 1] mapped to 0..255 (clipped)."""
    from ditdeploy.proof import distances

    a255 = (np.clip(a, -1, 1) + 1) * 127.5
    b255 = (np.clip(b, -1, 1) + 1) * 127.5
    return float(distances.psnr(a255, b255, 255.0))


def run_option(den: Any, noise: np.ndarray, labels: np.ndarray, *, method: str, steps: int, cfg_scale: float,
               cfg_interval: list[int] | None, cache_interval: int | None) -> dict[str, Any]:
    """Sample once with the option; returns samples, work and seconds."""
    from ditdeploy.config.macs import spent_gmacs
    from ditdeploy.diffusion import sample
    from ditdeploy.runtimes.base import Timed

    td = Timed(den)
    c0, t0 = time.process_time(), time.perf_counter()
    x = sample(td, noise, labels, method=method, steps=steps, cfg_scale=cfg_scale, num_classes=10, seed=0,
               cfg_interval=cfg_interval, cache_interval=cache_interval)
    return {"x": x, "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0, "rows": td.rows,
            "light_rows": td.light_rows, "gmac": spent_gmacs(den.config, td.rows - td.light_rows, td.light_rows)}


def quality(x: np.ndarray, labels: np.ndarray, clf: Any, real: dict[str, np.ndarray], seed: int) -> dict[str, float]:
    """Accuracy and within-class spread ratios (vs an equal-sized real held-out set) of samples ``x``."""
    from experiments.digits_quality import _spread, _to_pixels

    px = _to_pixels(x)
    rng = np.random.default_rng(seed)
    n = int(np.bincount(labels).max())
    take = np.concatenate([rng.choice(np.flatnonzero(real["y_test"] == c), size=n, replace=False)
                           for c in np.unique(labels)])
    s_std, s_pd = _spread(px, labels)
    r_std, r_pd = _spread(real["x_test"][take], real["y_test"][take])
    return {"accuracy": float((clf.predict(px) == labels).mean()), "spread_std_ratio": s_std / r_std,
            "spread_l2_ratio": s_pd / r_pd}


def evaluate(n_per_class: int = 12, method: str = "ddim", steps: int = 50, cfg_scale: float = 4.0, seed: int = 0,
             options=OPTIONS, threads: int | None = 1) -> dict[str, Any]:
    """Every option's work, time and quality (see module doc); the first option must be full work."""
    from ditdeploy.runtimes.torch import TorchDenoiser
    from ditdeploy.sources.checkpoints import load_model
    from ditdeploy.sources.shipped import DIGITS_CHECKPOINT
    from experiments.digits_quality import fit_classifier, real_digits

    real = real_digits()
    clf, clf_acc = fit_classifier(real)
    den = TorchDenoiser.from_model(load_model(DIGITS_CHECKPOINT), threads=threads)
    labels = np.repeat(np.arange(10, dtype=np.int64), n_per_class)
    noise = np.random.default_rng(seed).standard_normal((len(labels), 1, 8, 8)).astype(np.float32)
    rows, full = [], None
    for name, iv, ci in options:
        r = run_option(den, noise, labels, method=method, steps=steps, cfg_scale=cfg_scale, cfg_interval=iv,
                       cache_interval=ci)
        full = full or r
        rows.append({"option": name, "cfg_interval": iv, "cache_interval": ci, "rows": r["rows"],
                     "light_rows": r["light_rows"], "gmac": r["gmac"], "gmac_saved": 1 - r["gmac"] / full["gmac"],
                     "cpu_s": r["cpu_s"], "wall_s": r["wall_s"], "cpu_saved": 1 - r["cpu_s"] / full["cpu_s"],
                     "psnr_vs_full_db": psnr_255(r["x"], full["x"]) if r is not full else None,
                     **quality(r["x"], labels, clf, real, seed)})
    return {"model": "digits (shipped)", "samples": len(labels), "method": method, "steps": steps,
            "cfg_scale": cfg_scale, "seed": seed, "classifier_heldout_accuracy": clf_acc, "rows": rows}


def format_table(res: dict[str, Any]) -> str:
    """A markdown table of ``evaluate``'s rows."""
    lines = [f"digits, {res['samples']} samples, {res['method']} {res['steps']} steps, cfg {res['cfg_scale']}",
             "| option | GMAC (saved) | CPU s (saved) | accuracy | spread std / L2 (x real) | PSNR vs full |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        p = "-" if r["psnr_vs_full_db"] is None else f"{r['psnr_vs_full_db']:.1f} dB"
        lines.append(f"| {r['option']} | {r['gmac']:.2f} ({100 * r['gmac_saved']:.0f}%) | {r['cpu_s']:.2f} "
                     f"({100 * r['cpu_saved']:.0f}%) | {r['accuracy']:.3f} | {r['spread_std_ratio']:.3f} / "
                     f"{r['spread_l2_ratio']:.3f} | {p} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-per-class", type=int, default=12)
    ap.add_argument("--method", default="ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = evaluate(a.n_per_class, a.method, a.steps, a.cfg_scale, a.seed)
    from ditdeploy.bench.machine import machine_info

    res["machine"] = machine_info()
    print(format_table(res))
    if a.json:
        from ditdeploy.artifact.files import write_json_atomic

        write_json_atomic(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
