"""Samplers as pure functions over a model callable (k-diffusion style), numpy only.

``model(x, step_index, t) -> out``: ``x`` float32 (B, C, H, W), ``step_index`` 0..N-1 in sampling order, ``t`` the
ORIGINAL timestep (0..999); ``out`` float32 (B, C, H, W) eps, or (B, 2C, H, W) eps + learned-range variance values
(classifier-free guidance is already applied; see ``sampling.sample``, which builds this callable).

Per-step coefficients are computed in float64 up front and applied as float32 scalars to float32 arrays. Every step
returns a fresh array for x (callers and callbacks may keep references); scratch buffers are reused.

Noise: ``noise(step_index, shape) -> float32 standard normal array``; drawn only where it is used (DDPM steps with
t index > 0, DDIM with eta > 0), so sharing a noise source with another implementation means sharing it per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ditdeploy.diffusion.schedule import GaussianSchedule

__all__ = ["Callback", "ModelFn", "NoiseFn", "ddim", "ddpm", "dpmpp_2m"]

ModelFn = Callable[[np.ndarray, int, int], np.ndarray]
NoiseFn = Callable[[int, tuple], np.ndarray]
Callback = Callable[[int, int, np.ndarray], None]


def _steps(n: int, progress: bool, desc: str) -> Iterable[int]:
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), total=n, desc=desc, unit="step")


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).astype(np.float32)


def _split(out: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray | None]:
    if out.shape[1] == 2 * c:
        return out[:, :c], out[:, c:]
    return out, None


def _pred_x0(x, eps, a, b, clip, buf):
    """x0 = a*x - b*eps (fresh array), clipped to [-1, 1] when asked."""
    x0 = np.multiply(x, a)
    np.multiply(eps, b, out=buf)
    x0 -= buf
    if clip:
        np.clip(x0, -1.0, 1.0, out=x0)
    return x0


def ddpm(
    model: ModelFn,
    x: np.ndarray,
    schedule: GaussianSchedule,
    *,
    noise: NoiseFn,
    clip_denoised: bool = False,
    fixed_variance: str = "large",
    callback: Callback | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Ancestral sampling of the (respaced) process ``schedule`` (official ``p_sample_loop``).

    Per step i (from the last index down to 0): ``x0 = sqrt(1/abar) x - sqrt(1/abar - 1) eps``, mean
    ``coef1 x0 + coef2 x``; with learned sigma (2C channels) ``frac = (v+1)/2``, ``log_var = frac log(beta_i) +
    (1-frac) posterior_log_variance_clipped_i`` (LEARNED_RANGE); otherwise the fixed ``"large"`` (official default
    for models without sigma: log(append(pv[1], betas[1:]))) or ``"small"`` (posterior) variance.
    ``x <- mean + exp(log_var / 2) * noise``, no noise at index 0.
    """
    s = schedule
    if fixed_variance not in ("large", "small"):
        raise ValueError("fixed_variance must be 'large' or 'small'")
    n = s.num_timesteps
    c = x.shape[1]
    sr, srm1 = _f32(s.sqrt_recip_alphas_cumprod), _f32(s.sqrt_recipm1_alphas_cumprod)
    c1, c2 = _f32(s.posterior_mean_coef1), _f32(s.posterior_mean_coef2)
    min_log, max_log = _f32(s.posterior_log_variance_clipped), _f32(s.log_betas)
    fixed_log = s.fixed_large_log_variance if fixed_variance == "large" else s.posterior_log_variance_clipped
    fixed_std = _f32(np.exp(0.5 * fixed_log))
    x = np.array(x, dtype=np.float32)
    buf = np.empty_like(x)
    for k in _steps(n, progress, "ddpm"):
        i = n - 1 - k
        t = int(s.timestep_map[i])
        eps, v = _split(model(x, k, t), c)
        x0 = _pred_x0(x, eps, sr[i], srm1[i], clip_denoised, buf)
        x0 *= c1[i]
        np.multiply(x, c2[i], out=buf)
        x0 += buf  # x0 now holds the posterior mean
        if i > 0:
            z = np.asarray(noise(k, x.shape), dtype=np.float32)
            if v is not None:
                frac = (v + np.float32(1)) * np.float32(0.5)
                log_var = frac * max_log[i] + (np.float32(1) - frac) * min_log[i]
                z = z * np.exp(np.float32(0.5) * log_var)
            else:
                z = z * fixed_std[i]
            x0 += z
        x = x0
        if callback is not None:
            callback(k, t, x)
    return x


def ddim(
    model: ModelFn,
    x: np.ndarray,
    schedule: GaussianSchedule,
    *,
    eta: float = 0.0,
    noise: NoiseFn | None = None,
    clip_denoised: bool = False,
    callback: Callback | None = None,
    progress: bool = False,
) -> np.ndarray:
    """DDIM over the (respaced) process ``schedule`` (official ``ddim_sample_loop``; eq. 12 of the DDIM paper).

    ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z``, ``sigma = eta sqrt((1-abar_prev) /
    (1-abar)) sqrt(1 - abar/abar_prev)``. eta=0 is deterministic; the last step (abar_prev = 1) returns the x_0
    prediction. With ``clip_denoised`` eps is re-derived from the clipped x_0, as the reference does.
    """
    s = schedule
    n = s.num_timesteps
    ab, abp = s.alphas_cumprod, s.alphas_cumprod_prev
    sigma = eta * np.sqrt((1 - abp) / (1 - ab)) * np.sqrt(1 - ab / abp)
    if (sigma > 0).any() and noise is None:
        raise ValueError("ddim with eta > 0 needs a noise source")
    sr, srm1 = _f32(s.sqrt_recip_alphas_cumprod), _f32(s.sqrt_recipm1_alphas_cumprod)
    c_x0, c_eps = _f32(np.sqrt(abp)), _f32(np.sqrt(np.maximum(1 - abp - sigma**2, 0.0)))
    sig32 = _f32(sigma)
    x = np.array(x, dtype=np.float32)
    buf = np.empty_like(x)
    for k in _steps(n, progress, "ddim"):
        i = n - 1 - k
        t = int(s.timestep_map[i])
        eps, _ = _split(model(x, k, t), x.shape[1])
        x0 = _pred_x0(x, eps, sr[i], srm1[i], clip_denoised, buf)
        if clip_denoised:  # eps consistent with the clipped x0
            eps = (x * sr[i] - x0) / srm1[i]
        x0 *= c_x0[i]
        np.multiply(eps, c_eps[i], out=buf)
        x0 += buf
        if i > 0 and sigma[i] > 0:
            x0 += np.asarray(noise(k, x.shape), dtype=np.float32) * sig32[i]
        x = x0
        if callback is not None:
            callback(k, t, x)
    return x


def dpmpp_2m(
    model: ModelFn,
    x: np.ndarray,
    schedule: GaussianSchedule,
    timesteps: np.ndarray,
    *,
    clip_denoised: bool = False,
    callback: Callback | None = None,
    progress: bool = False,
) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022, data prediction, multistep) on the discrete schedule ``schedule``.

    ``timesteps``: original timesteps to evaluate, any order (sorted descending here), e.g.
    ``sampling_timesteps("dpm-solver++", N)``. With ``alpha = sqrt(abar)``, ``sigma = sqrt(1-abar)``,
    ``lambda = log(alpha/sigma)``, ``h = lambda_next - lambda``, each step between evaluations is
    ``x <- (sigma_next/sigma) x - alpha_next expm1(-h) D``, with ``D = x0`` at the first step (first order) and
    ``D = (1 + 1/(2r)) x0_k - 1/(2r) x0_{k-1}``, ``r = h_prev / h``, afterwards. After the last evaluation a final
    first-order step to sigma=0 returns its x_0 prediction. N timesteps = N model evaluations.
    """
    ts = np.sort(np.asarray(timesteps, dtype=np.int64))[::-1]
    if ts.size == 0 or ts[-1] < 0 or ts[0] >= schedule.num_timesteps or np.unique(ts).size != ts.size:
        raise ValueError("timesteps must be unique and lie in the schedule")
    n = ts.size
    ab = schedule.alphas_cumprod[ts]
    alpha, sigma = np.sqrt(ab), np.sqrt(1 - ab)
    lam = np.log(alpha) - np.log(sigma)
    sr, srm1 = _f32(1 / alpha), _f32(sigma / alpha)
    cx, cd, w_cur, w_prev = (np.zeros(n, np.float32) for _ in range(4))
    for k in range(n - 1):
        h = lam[k + 1] - lam[k]
        cx[k] = sigma[k + 1] / sigma[k]
        cd[k] = -alpha[k + 1] * np.expm1(-h)
        if k == 0:
            w_cur[k], w_prev[k] = 1.0, 0.0
        else:
            r = (lam[k] - lam[k - 1]) / h
            w_cur[k], w_prev[k] = 1 + 1 / (2 * r), -1 / (2 * r)
    x = np.array(x, dtype=np.float32)
    buf = np.empty_like(x)
    x0_prev = None
    for k in _steps(n, progress, "dpm-solver++"):
        t = int(ts[k])
        eps, _ = _split(model(x, k, t), x.shape[1])
        x0 = _pred_x0(x, eps, sr[k], srm1[k], clip_denoised, buf)
        if k == n - 1:
            x = x0
        else:
            d = x0 if x0_prev is None else x0 * w_cur[k] + x0_prev * w_prev[k]
            new = np.multiply(x, cx[k])
            np.multiply(d, cd[k], out=buf)
            new += buf
            x = new
        x0_prev = x0
        if callback is not None:
            callback(k, t, x)
    return x
