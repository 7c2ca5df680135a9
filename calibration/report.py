"""Per-timestep error curves of a quantized denoiser against its floating-point reference.

Quantization error in a diffusion model is not uniform over the trajectory: activations at t near 999 (pure noise) and
near 0 (almost clean images) have different ranges, and the error of one call feeds the next. The curve groups the
held-out validation inputs by timestep and reports, per t, the cosine similarity and relative L2 error of the
quantized model's output against the reference's (both computed on the same inputs), plus an overall summary.
Numpy only; matplotlib is imported only to draw the optional PNG.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.proof.parity import RunParity, compare, compare_runs

__all__ = ["batch_rows", "curve_of", "error_curve", "plot_error_curves", "probe_batches", "summarize_curve"]


def batch_rows(a: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``a`` in consecutive pieces of ``batch_size`` rows (the last one shorter)."""
    return [a[i:i + batch_size] for i in range(0, int(a.shape[0]), batch_size)]


def probe_batches(x: np.ndarray, t: np.ndarray, y: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The validation inputs as denoiser feeds of ``batch_size`` rows (the last one shorter)."""
    return [{"x": a, "t": b, "y": c} for a, b, c in
            zip(batch_rows(x, batch_size), batch_rows(t, batch_size), batch_rows(y, batch_size), strict=True)]


def _feeds_run(fn: Callable[..., np.ndarray]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    return lambda f: np.asarray(fn(f["x"], f["t"], f["y"]), dtype=np.float32)


def error_curve(
    reference: Callable[..., np.ndarray] | np.ndarray,
    candidate: Callable[..., np.ndarray],
    x: np.ndarray,
    t: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """Compare ``candidate(x, t, y)`` with ``reference(x, t, y)`` per timestep value (``parity.compare_runs`` in
    batches of ``batch_size``, recorded without judging; :func:`curve_of`).

    ``reference`` may also be the reference outputs already computed on ``x, t, y`` (an array with one row per
    input).
    """
    feeds = probe_batches(x, t, y, batch_size)
    ref = (batch_rows(np.asarray(reference, dtype=np.float32), batch_size) if isinstance(reference, np.ndarray)
           else _feeds_run(reference))
    res = compare_runs(ref, _feeds_run(candidate), feeds, thresholds=None, what="error curve", pooled=True,
                       keep_outputs=True, progress=progress)
    return curve_of(res, t)


def curve_of(res: RunParity, t: np.ndarray) -> dict[str, Any]:
    """The error curve of a pooled :func:`ditdeploy.proof.parity.compare_runs` result that kept its outputs, one row per
    input at timesteps ``t``.

    Returns ``{"per_timestep": [{"t", "n", "cosine", "rel_l2", "max_abs"}...] (ascending t), "overall": {...}}`` where
    the per-t numbers compare the concatenated outputs of all inputs at that t, and ``overall`` holds the
    per-call cosine/rel-L2 statistics (mean, min/max) and the metrics of everything concatenated.
    """
    cand, ref = res.stacked()
    n = int(cand.shape[0])
    per_call = res.rows()
    per_call_cos = np.array([c.cosine for c in per_call])
    per_call_rel = np.array([c.rel_l2 for c in per_call])
    curve = []
    for tv in np.unique(t):
        m = t == tv
        cmp = compare(cand[m], ref[m])
        curve.append({"t": int(tv), "n": int(m.sum()), "cosine": cmp.cosine, "rel_l2": cmp.rel_l2,
                      "max_abs": cmp.max_abs})
    allc = res.pooled[None]
    overall = {
        "inputs": n,
        "cosine": allc.cosine,
        "rel_l2": allc.rel_l2,
        "max_abs": allc.max_abs,
        "finite": allc.finite,
        "per_call_cosine_mean": float(per_call_cos.mean()) if n else 1.0,
        "per_call_cosine_min": float(per_call_cos.min()) if n else 1.0,
        "per_call_rel_l2_mean": float(per_call_rel.mean()) if n else 0.0,
        "per_call_rel_l2_max": float(per_call_rel.max()) if n else 0.0,
    }
    return {"per_timestep": curve, "overall": overall}


def summarize_curve(curve: dict[str, Any]) -> dict[str, Any]:
    """The worst timestep by cosine and by rel-L2 (for one-line reports)."""
    pts = curve.get("per_timestep", [])
    if not pts:
        return {}
    worst_cos = min(pts, key=lambda p: p["cosine"])
    worst_rel = max(pts, key=lambda p: p["rel_l2"])
    return {"worst_cosine": {"t": worst_cos["t"], "cosine": worst_cos["cosine"]},
            "worst_rel_l2": {"t": worst_rel["t"], "rel_l2": worst_rel["rel_l2"]}}


def plot_error_curves(curves: dict[str, dict[str, Any]], out_png: str | os.PathLike, title: str = "") -> Path:
    """Draw rel-L2 and (1 - cosine) against t for each named curve into ``out_png`` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ditdeploy.artifact.files import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, c in curves.items():
        ts = [p["t"] for p in c["per_timestep"]]
        axes[0].plot(ts, [p["rel_l2"] for p in c["per_timestep"]], marker=".", label=name)
        axes[1].plot(ts, [max(1.0 - p["cosine"], 1e-12) for p in c["per_timestep"]], marker=".", label=name)
    axes[0].set_ylabel("rel-L2 vs fp32")
    axes[1].set_ylabel("1 - cosine vs fp32")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("timestep t (999 = noise)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png
