"""One wrapper around a denoiser (or decoder) call: it times, counts calls and rows, and can watch for NaN/Inf.

``Watched(fn)`` is what ``sample``/``bench`` time the model with (``ditdeploy.runtimes.Timed`` is this class) and
what ``check`` runs the artifact through (``finite=True``); :func:`ensure_finite` is the one NaN/Inf test, also used
by the sampler's guidance step. Feature-reuse calls (``forward_full`` / ``forward_light``) are timed, counted and
checked the same way. Numpy + stdlib only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ditdeploy.errors import NumericsError


class NonFiniteError(NumericsError):
    """A model produced NaN/Inf; the message names the model and where."""


def nonfinite_desc(a: np.ndarray) -> str:
    """``"3 NaN and 0 Inf of 64 values"``."""
    n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    return f"{n_nan} NaN and {n_inf} Inf of {a.size} values"


def ensure_finite(out: Any, message: Callable[[np.ndarray], str], error: type[Exception] = NonFiniteError) -> None:
    """Raise ``error(message(out))`` when ``out`` holds NaN or Inf (``message`` is built only then)."""
    a = np.asarray(out)
    if not np.isfinite(a).all():
        raise error(message(a))


class Watched:
    """Wrap a denoiser/decoder callable: accumulate wall time, calls and rows (axis 0 of the first argument), and
    with ``finite=True`` raise :class:`NonFiniteError` naming ``name`` and the call (counted in ``unit``s) when an
    output holds NaN/Inf.

    Attribute access (``name``, ``config``, ``manifest``, ``supports_cache``…) is forwarded to the wrapped object, so
    a watched denoiser can be handed to the sampler in place of the original.
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None, *, finite: bool = False,
                 unit: str = "call"):
        self.fn = fn
        self.label = name
        self.finite = finite
        self.unit = unit  # how a NaN message counts calls: "call", or "sampling step" inside a sampling loop
        self.seconds = 0.0
        self.calls = 0
        self.rows = 0
        self.light_calls = 0  # feature-reuse light steps (included in calls/rows)
        self.light_rows = 0

    def _timed(self, fn: Callable[..., Any], args: tuple, light: bool = False) -> Any:
        t0 = time.perf_counter()
        try:
            out = fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            rows = (int(np.shape(args[0])[0]) if np.ndim(args[0]) else 1) if args else 0
            self.rows += rows
            if light:
                self.light_calls += 1
                self.light_rows += rows
        if self.finite:
            ensure_finite(out[0] if isinstance(out, tuple) else out, lambda a: self._nonfinite_message(a, args))
        return out

    def _nonfinite_message(self, a: np.ndarray, args: tuple) -> str:
        who = self.label or getattr(self.fn, "name", None) or "the model"
        t = f" (denoiser call with t={int(np.asarray(args[1]).ravel()[0])})" if len(args) >= 2 and np.size(args[1]) else ""
        return f"{who} produced {nonfinite_desc(a)} at {self.unit} {self.calls}{t}"

    def __call__(self, *args: Any) -> np.ndarray:
        return self._timed(self.fn, args)

    def forward_full(self, x: Any, t: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Timed ``fn.forward_full`` (feature reuse: output and cache)."""
        return self._timed(self.fn.forward_full, (x, t, y))

    def forward_light(self, x: Any, t: Any, y: Any, cache: np.ndarray) -> np.ndarray:
        """Timed ``fn.forward_light`` (feature reuse: output from the cache), counted as a light call."""
        return self._timed(self.fn.forward_light, (x, t, y, cache), light=True)

    def __getattr__(self, item: str) -> Any:
        if item == "fn":  # during unpickling / before __init__
            raise AttributeError(item)
        return getattr(self.fn, item)
