"""The noise contract every run keeps: image i's initial and per-step noise derive from ``(seed, i)`` only.

So an image is the same whichever batch, shard, backend or server call it is sampled in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["PerImageNoise", "initial_noise"]


def initial_noise(seed: int, indices: Sequence[int] | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """x_T for the images with global ``indices``: image i's noise comes from ``default_rng([seed, i, 0])``."""
    out = np.empty((len(indices), *shape), dtype=np.float32)
    for k, i in enumerate(indices):
        out[k] = np.random.default_rng([int(seed), int(i), 0]).standard_normal(shape, dtype=np.float32)
    return out


class PerImageNoise:
    """The sampler's per-step noise (``noise_fn(step_index, shape)``) drawn per image from ``(seed, i, 1)``.

    DDPM / DDIM(eta>0) noise for image i is then the same whichever batch or shard it is sampled in.
    """

    def __init__(self, seed: int, indices: Sequence[int] | np.ndarray):
        self.gens = [np.random.default_rng([int(seed), int(i), 1]) for i in indices]

    def __call__(self, step_index: int, shape: tuple[int, ...]) -> np.ndarray:
        if shape[0] != len(self.gens):
            raise ValueError(f"noise for a batch of {shape[0]} requested, {len(self.gens)} images set up")
        out = np.empty(shape, dtype=np.float32)
        for k, g in enumerate(self.gens):
            out[k] = g.standard_normal(shape[1:], dtype=np.float32)
        return out
