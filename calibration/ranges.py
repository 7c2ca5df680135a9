"""Streaming activation-range estimators for INT8 calibration: percentile, entropy (KL) and min/max.

Each tensor gets a :class:`RangeHistogram`: a fixed-size signed histogram over ``[-top, top]``. ``top`` starts at the
first batch's largest magnitude and doubles when a later batch exceeds it (adjacent bins merge pairwise, so no count
is ever re-estimated). Adding a batch is one ``np.bincount`` over at most ~1 M values (whole channel rows, strided),
which keeps calibration of XL/2 (112 tensors of up to 9.4 M values per batch) fast where ORT's collector
(``np.histogram(bins=edges)``) sorts every batch in full.

- ``percentile(p, symmetric=True)``: the magnitude below which ``p`` % of all values lie -> ``(-a, a)``;
  asymmetric: ``(100 - p) / 2`` % cut from each tail -> ``(lo, hi)``.
- ``entropy()``: TensorRT's KL-divergence calibration (Migacz, GTC 2017) on the magnitude histogram with 128
  quantization levels -> ``(-a, a)``.
- ``minmax(symmetric)``: the observed extremes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RangeHistogram", "kl_threshold"]


class RangeHistogram:
    """Signed histogram of one tensor's values over ``[-top, top]`` (``2 * bins`` bins), with a doubling range."""

    def __init__(self, bins: int = 2048, max_values: int = 1 << 20):
        if bins < 8 or bins % 2:
            raise ValueError("bins must be an even number >= 8")
        self.bins = bins
        self.max_values = max_values
        self.top = 0.0
        self.hist = np.zeros(2 * bins, dtype=np.int64)
        self.lo = np.inf
        self.hi = -np.inf
        self.count = 0

    def _grow(self, m: float) -> None:
        if self.top == 0.0:
            self.top = m if m > 0 else 1e-12
            return
        b = self.bins
        while m > self.top:
            # old bin k covers [-top + k w, -top + (k+1) w); after doubling it falls into bin b/2 + k//2
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist[:] = 0
            self.hist[b // 2: b // 2 + b] = merged
            self.top *= 2.0

    def add(self, a: np.ndarray) -> None:
        """Accumulate the values of ``a`` (finite). Min/max see every value; the histogram sees at most
        ``max_values`` of them: whole rows of the last (channel) axis, evenly strided, so every channel is
        represented."""
        a = np.asarray(a, dtype=np.float32)
        if a.size == 0:
            return
        amin, amax = float(a.min()), float(a.max())
        self.lo, self.hi = min(self.lo, amin), max(self.hi, amax)
        self._grow(max(abs(amin), abs(amax)))
        rows = a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(-1, 1)
        k = max(1, -(-a.size // self.max_values))
        sub = np.ascontiguousarray(rows[::k]).ravel()
        q = sub * np.float32(self.bins / self.top)
        q += np.float32(self.bins)  # >= 0, so the int cast is a floor
        idx = q.astype(np.int32)
        np.clip(idx, 0, 2 * self.bins - 1, out=idx)
        self.hist += np.bincount(idx, minlength=2 * self.bins)
        self.count += int(sub.size)

    @property
    def width(self) -> float:
        return self.top / self.bins

    @property
    def pos(self) -> np.ndarray:
        return self.hist[self.bins:]

    @property
    def neg(self) -> np.ndarray:
        return self.hist[: self.bins][::-1]

    def magnitude(self) -> np.ndarray:
        return self.pos + self.neg

    def _tail_threshold(self, h: np.ndarray, tail: float) -> float:
        """Smallest bin edge e with (count of values above e) <= tail."""
        above = np.cumsum(h[::-1])[::-1]  # above[i] = count in bins i..end
        ok = np.flatnonzero(above <= tail)
        i = int(ok[0]) if ok.size else self.bins
        return i * self.width

    def percentile(self, p: float, symmetric: bool = True) -> tuple[float, float]:
        """Range keeping ``p`` percent of the values (clipped to the observed min/max)."""
        if self.count == 0:
            return 0.0, 0.0
        if symmetric:
            tail = self.count * (100.0 - p) / 100.0
            a = min(self._tail_threshold(self.magnitude(), tail), max(abs(self.lo), abs(self.hi)))
            a = max(a, self.width)  # never a zero range
            return -a, a
        tail = self.count * (100.0 - p) / 200.0
        hi = min(self._tail_threshold(self.pos, tail), max(self.hi, 0.0))
        lo = -min(self._tail_threshold(self.neg, tail), max(-self.lo, 0.0))
        return lo, hi

    def minmax(self, symmetric: bool = True) -> tuple[float, float]:
        if self.count == 0:
            return 0.0, 0.0
        if symmetric:
            a = max(abs(self.lo), abs(self.hi))
            return -a, a
        return min(self.lo, 0.0), max(self.hi, 0.0)

    def entropy(self, levels: int = 128) -> tuple[float, float]:
        """Symmetric range minimising KL(P || Q) of the magnitude histogram quantized to ``levels`` bins."""
        if self.count == 0:
            return 0.0, 0.0
        i = kl_threshold(self.magnitude(), levels)
        a = max(min(i * self.width, max(abs(self.lo), abs(self.hi))), self.width)
        return -a, a


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Move ``eps`` of mass onto empty bins so the KL divergence is finite (as TensorRT / ORT do)."""
    zero = p == 0
    nz = int(zero.sum())
    n = p.size - nz
    if n == 0:
        return None
    take = eps * nz / n
    out = p.astype(np.float64).copy()
    out[zero] = eps
    out[~zero] -= take
    if (out[~zero] <= 0).any():
        return None
    return out


def kl_threshold(hist: np.ndarray, levels: int = 128, stride: int | None = None) -> int:
    """Bin index i (threshold = i bins) minimising KL(P_i || Q_i) (TensorRT's entropy calibration).

    P_i: the first i bins with all mass above folded into bin i-1; Q_i: those i bins merged into ``levels`` groups
    and spread back uniformly over each group's non-empty bins. Candidates i = levels, levels + stride, ..., n.
    """
    hist = np.asarray(hist, dtype=np.float64)
    n = hist.size
    if n <= levels:
        return n
    last = int(np.flatnonzero(hist)[-1]) + 1 if hist.any() else n
    stride = stride or max(1, n // 512)
    best_i, best_kl = n, np.inf
    tail = np.cumsum(hist[::-1])[::-1]  # tail[i] = sum(hist[i:])
    for i in range(levels, min(n, last + stride) + 1, stride):
        i = min(i, n)
        p = hist[:i].copy()
        if i < n:
            p[-1] += tail[i]
        src = hist[:i]
        # group boundaries for levels groups over i bins
        edges = (np.arange(levels + 1) * i) // levels
        starts = edges[:-1]
        q_sum = np.add.reduceat(src, starts)
        nonzero = (src != 0).astype(np.float64)
        nz_count = np.add.reduceat(nonzero, starts)
        group = np.repeat(np.arange(levels), np.diff(edges))
        with np.errstate(divide="ignore", invalid="ignore"):
            per = np.where(nz_count > 0, q_sum / np.maximum(nz_count, 1), 0.0)
        q = per[group] * nonzero
        ps, qs = _smooth(p), _smooth(q)
        if ps is None or qs is None:
            continue
        ps /= ps.sum()
        qs /= qs.sum()
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i
