"""Gaussian diffusion schedule tables in float64 (numpy only).

``GaussianSchedule`` holds the same tables as the official ``GaussianDiffusion`` (facebookresearch/DiT,
``diffusion/gaussian_diffusion.py``) for the linear beta schedule, plus ``respace()`` which builds the reduced process of
the official ``SpacedDiffusion``. Every table is a public float64 array of length ``num_timesteps`` indexed by the
(respaced) step index ``i``; ``timestep_map[i]`` is the ORIGINAL timestep (0..999) the network must be called with.

The training code (torch) uses these tables for ``q_sample``, the posterior and the variational-bound terms: convert
with ``torch.from_numpy(arr)`` / ``torch.tensor(arr)`` and index by timestep. Do not mutate the arrays in place.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import numpy as np

__all__ = ["GaussianSchedule", "NUM_TRAIN_TIMESTEPS", "base_schedule", "linear_betas"]

NUM_TRAIN_TIMESTEPS = 1000


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Linear betas (float64), scaled by ``1000 / num_timesteps`` like the official "linear" named schedule."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


class GaussianSchedule:
    """Float64 tables of a discrete Gaussian diffusion process ``q(x_t | x_0) = N(sqrt(abar_t) x_0, 1 - abar_t)``.

    Attributes (float64, shape ``(num_timesteps,)``, index = step index of THIS process):

    - ``betas``, ``alphas`` (= 1 - betas), ``log_betas``
    - ``alphas_cumprod`` (abar_t), ``alphas_cumprod_prev`` (abar_{t-1}, 1.0 at index 0), ``alphas_cumprod_next``
      (abar_{t+1}, 0.0 at the end)
    - ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``, ``log_one_minus_alphas_cumprod``
    - ``sqrt_recip_alphas_cumprod`` (1/sqrt(abar)), ``sqrt_recipm1_alphas_cumprod`` (sqrt(1/abar - 1)):
      ``x0 = sqrt_recip * x_t - sqrt_recipm1 * eps``
    - ``posterior_variance`` = beta_t (1 - abar_{t-1}) / (1 - abar_t) of ``q(x_{t-1} | x_t, x_0)``
    - ``posterior_log_variance_clipped`` = log(append(pv[1], pv[1:])) (pv[0] is 0; with a single step, where the
      variance is never used, it is log(beta_0))
    - ``posterior_mean_coef1`` (multiplies x_0), ``posterior_mean_coef2`` (multiplies x_t)
    - ``fixed_large_log_variance`` = log(append(pv[1], betas[1:])) (the official FIXED_LARGE choice)

    Also ``timestep_map`` (int64): original timestep of each step index (identity for an un-respaced schedule) and
    ``num_timesteps``.
    """

    def __init__(self, betas: Iterable[float], timestep_map: Iterable[int] | None = None):
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError("betas must be a non-empty 1-D array")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        n = int(betas.shape[0])
        self.num_timesteps = n
        self.betas = betas
        self.timestep_map = (
            np.arange(n, dtype=np.int64) if timestep_map is None else np.array(list(timestep_map), dtype=np.int64)
        )
        if self.timestep_map.shape != (n,):
            raise ValueError("timestep_map must have one entry per beta")

        self.alphas = 1.0 - betas
        self.log_betas = np.log(betas)
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus
        if n > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
            self.fixed_large_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))
        else:  # one step: no noise is ever added at index 0, the value is only a placeholder
            self.posterior_log_variance_clipped = self.log_betas.copy()
            self.fixed_large_log_variance = self.log_betas.copy()
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / one_minus

    def respace(self, use_timesteps: Iterable[int]) -> GaussianSchedule:
        """The reduced process over the kept timesteps (official ``SpacedDiffusion``).

        Kept timesteps ``s_0 < s_1 < ...`` get ``beta_i = 1 - abar_{s_i} / abar_{s_{i-1}}`` (``abar_{s_{-1}} = 1``), so
        the respaced ``alphas_cumprod`` equals this schedule's at the kept timesteps (up to float64 rounding).
        ``timestep_map`` composes with this schedule's map, so it always refers to the original timesteps.
        """
        keep = sorted({int(t) for t in use_timesteps})
        if not keep:
            raise ValueError("use_timesteps is empty")
        if keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"use_timesteps must lie in [0, {self.num_timesteps})")
        abar = self.alphas_cumprod[keep]
        prev = np.append(1.0, abar[:-1])
        return GaussianSchedule(1.0 - abar / prev, self.timestep_map[keep])

    def __repr__(self) -> str:
        return f"GaussianSchedule(num_timesteps={self.num_timesteps}, timesteps={self.timestep_map[0]}..{self.timestep_map[-1]})"


@lru_cache(maxsize=4)
def base_schedule(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> GaussianSchedule:
    """The (cached) official training schedule: linear betas 1e-4..0.02 over ``num_timesteps`` steps."""
    return GaussianSchedule(linear_betas(num_timesteps))
