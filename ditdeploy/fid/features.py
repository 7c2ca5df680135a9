"""What a feature extractor is: a callable on uint8 NHWC batches returning :class:`Features`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["Extractor", "Features"]


@dataclass(frozen=True)
class Features:
    """An extractor's output for one batch: ``pool`` rows for FID / precision / recall, ``probs`` (class
    probabilities) for the Inception Score, ``spatial`` rows for sFID (None when the extractor has none)."""

    pool: np.ndarray
    probs: np.ndarray
    spatial: np.ndarray | None = None


class Extractor(Protocol):
    """``name``, the image shape it requires (None: any), whether it has spatial features, ``describe()`` for the
    report (name, weights and their sha256), and ``__call__(u8 (N, H, W, C)) -> Features``."""

    name: str
    image_shape: tuple[int, int, int] | None
    has_spatial: bool

    def __call__(self, u8: np.ndarray) -> Features: ...

    def describe(self) -> dict[str, Any]: ...
