"""The DiT training objective: ``mse(eps) + vb`` with a learned (range-interpolated) variance.

Equal to the official ``GaussianDiffusion.training_losses`` (facebookresearch/DiT, loss type MSE, eps prediction,
LEARNED_RANGE variance) over the 1000-step linear schedule:

- ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``;
- ``mse`` = per-sample mean of ``(noise - eps)^2``;
- ``vb`` = the variational-bound term in bits per dimension with the eps prediction *detached* (only the variance
  channels learn from it): KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0, the discretized Gaussian decoder NLL at
  t = 0;
- ``loss = mse + vb``.

Schedule tables are float64; a coefficient is looked up per sample and then cast to float32, as the official code
does, and all further arithmetic is float32 (the model output is cast to float32 first, so this also holds under
autocast).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch

__all__ = ["training_losses", "schedule_tables", "normal_kl", "discretized_gaussian_log_likelihood"]

NUM_TIMESTEPS = 1000
_LN2 = math.log(2.0)


@lru_cache(maxsize=4)
def _tables_np(num_timesteps: int = NUM_TIMESTEPS) -> dict[str, np.ndarray]:
    """float64 tables the loss needs, from the shared schedule ``ditdeploy.diffusion.base_schedule``."""
    from ditdeploy.diffusion import base_schedule

    s = base_schedule(num_timesteps)
    return {
        "sqrt_abar": s.sqrt_alphas_cumprod,
        "sqrt_one_minus_abar": s.sqrt_one_minus_alphas_cumprod,
        "sqrt_recip_abar": s.sqrt_recip_alphas_cumprod,
        "sqrt_recipm1_abar": s.sqrt_recipm1_alphas_cumprod,
        "post_coef1": s.posterior_mean_coef1,
        "post_coef2": s.posterior_mean_coef2,
        # log posterior variance with its first entry (0) replaced by the second one
        "post_log_var_clipped": s.posterior_log_variance_clipped,
        "log_betas": s.log_betas,
    }


def schedule_tables(num_timesteps: int = NUM_TIMESTEPS) -> dict[str, np.ndarray]:
    """The float64 coefficient tables used by :func:`training_losses` (copies)."""
    return {k: v.copy() for k, v in _tables_np(num_timesteps).items()}


def _extract(name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-sample coefficient ``table[t]`` (float64 lookup, then float32), shaped to broadcast over (N, C, H, W)."""
    arr = torch.from_numpy(_tables_np()[name]).to(t.device)[t].float()
    return arr.reshape(-1, *([1] * (ndim - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # tanh approximation of the standard normal CDF (the one the reference loss uses)
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-probability (nats) of data ``x`` in [-1, 1] quantised to 256 bins of width 2/255.

    The edge bins extend to -inf / +inf (x < -0.999, x > 0.999); probabilities are clamped at 1e-12 before the log.
    """
    inv_std = torch.exp(-log_scales)
    centred = x - means
    cdf_plus = _approx_std_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def training_losses(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-sample ``loss``, ``mse`` and ``vb`` (each shape (N,)) of a learned-sigma eps-prediction DiT.

    ``model(x_t, t, y)`` must return (N, 2C, H, W): eps in channels ``:C``, the variance interpolation value v in
    ``C:`` (log-variance = frac * log(beta_t) + (1 - frac) * log(posterior variance, clipped), frac = (v + 1) / 2).
    ``t`` holds integer timesteps in 0..999; ``y`` the labels passed through to the model unchanged.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    t = t.long()
    nd = x0.ndim
    x0 = x0.float()
    noise = noise.float()
    x_t = _extract("sqrt_abar", t, nd) * x0 + _extract("sqrt_one_minus_abar", t, nd) * noise
    out = model(x_t, t, y).float()
    c = x0.shape[1]
    if out.shape[1] != 2 * c or out.shape[2:] != x0.shape[2:]:
        raise ValueError(f"model output {tuple(out.shape)} is not (N, 2C, H, W) for x0 {tuple(x0.shape)}: "
                         "training_losses needs a learned-sigma model")
    eps, v = out[:, :c], out[:, c:]
    mse = _mean_flat((noise - eps) ** 2)

    # Variational bound on the variance channels only: the mean comes from the detached eps.
    eps_d = eps.detach()
    coef1, coef2 = _extract("post_coef1", t, nd), _extract("post_coef2", t, nd)
    min_log = _extract("post_log_var_clipped", t, nd)
    max_log = _extract("log_betas", t, nd)
    frac = (v + 1.0) / 2.0
    model_log_var = frac * max_log + (1.0 - frac) * min_log
    pred_x0 = _extract("sqrt_recip_abar", t, nd) * x_t - _extract("sqrt_recipm1_abar", t, nd) * eps_d
    model_mean = coef1 * pred_x0 + coef2 * x_t
    true_mean = coef1 * x0 + coef2 * x_t
    kl = _mean_flat(normal_kl(true_mean, min_log, model_mean, model_log_var)) / _LN2
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / _LN2
    vb = torch.where(t == 0, nll, kl)
    return {"loss": mse + vb, "mse": mse, "vb": vb}
