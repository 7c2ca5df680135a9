"""Numerical comparison metrics (numpy only): rel-L2, cosine, max-abs, PSNR, SSIM.

The elementwise primitives under ``ditdeploy.proof.parity.compare`` (the one comparison export verification, ``check``,
calibration reports and OpenVINO conversion use), so that every number the project reports is computed one way.
Computations run in float64.
"""

from __future__ import annotations

import numpy as np


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def rel_l2(actual, reference) -> float:
    """||actual - reference||_2 / ||reference||_2 (0 when both are zero; inf when only the reference is)."""
    a, r = _f64(actual), _f64(reference)
    num = float(np.linalg.norm((a - r).ravel()))
    den = float(np.linalg.norm(r.ravel()))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def cosine(actual, reference) -> float:
    """Cosine similarity of the flattened arrays (1.0 when both are zero)."""
    a, r = _f64(actual).ravel(), _f64(reference).ravel()
    na, nr = np.linalg.norm(a), np.linalg.norm(r)
    if na == 0.0 and nr == 0.0:
        return 1.0
    if na == 0.0 or nr == 0.0:
        return 0.0
    return float(np.dot(a, r) / (na * nr))


def max_abs(actual, reference) -> float:
    """Largest absolute elementwise difference."""
    return float(np.max(np.abs(_f64(actual) - _f64(reference)))) if np.size(actual) else 0.0


def psnr(actual, reference, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical inputs)."""
    mse = float(np.mean((_f64(actual) - _f64(reference)) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def _box(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k windows ('valid') of the last two axes, via cumulative sums."""
    c = np.cumsum(np.cumsum(a, axis=-2), axis=-1)
    c = np.pad(c, [(0, 0)] * (a.ndim - 2) + [(1, 0), (1, 0)])
    s = c[..., k:, k:] - c[..., :-k, k:] - c[..., k:, :-k] + c[..., :-k, :-k]
    return s / (k * k)


def ssim(actual, reference, data_range: float = 255.0, win: int = 7) -> float:
    """Mean SSIM (Wang et al. 2004) with a uniform ``win`` x ``win`` window over (..., H, W) arrays.

    Images smaller than the window use the whole image as one window.
    """
    x, y = _f64(actual), _f64(reference)
    win = min(win, x.shape[-1], x.shape[-2])
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _box(x, win), _box(y, win)
    sxx = _box(x * x, win) - mx * mx
    syy = _box(y * y, win) - my * my
    sxy = _box(x * y, win) - mx * my
    n = win * win
    cov = n / max(n - 1, 1)  # unbiased, as skimage does
    sxx, syy, sxy = sxx * cov, syy * cov, sxy * cov
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(np.mean(s))
