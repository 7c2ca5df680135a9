"""Test-only torch reference of the official DiT diffusion semantics (GaussianDiffusion + SpacedDiffusion).

Written from the documented behaviour of facebookresearch/DiT ``diffusion/`` (not copied), to check
``ditdeploy.diffusion`` against: float64 numpy tables; every per-timestep coefficient is gathered from its float64
table and cast to float32 before it touches a tensor (as the reference's ``_extract_into_tensor`` does); eps
prediction, LEARNED_RANGE variance; the model is called with the ORIGINAL timestep through the respacing map;
``p_sample_loop`` and ``ddim_sample_loop`` over the full (doubled, for guidance) batch.

Deliberately independent of ``ditdeploy.diffusion``: its own respacing and its own tables.
"""

from __future__ import annotations

import numpy as np
import torch


def ref_respacing(total: int, spec: str) -> list[int]:
    """Kept timesteps, ascending: "ddimN" = smallest integer stride with N steps; "a,b" = equal sections."""
    if spec.startswith("ddim"):
        want = int(spec[4:])
        for stride in range(1, total):
            kept = list(range(0, total, stride))
            if len(kept) == want:
                return kept
        raise ValueError(spec)
    counts = [int(c) for c in spec.split(",")]
    out: list[int] = []
    start = 0
    for j, cnt in enumerate(counts):
        size = total // len(counts) + (1 if j < total % len(counts) else 0)
        step = 1 if cnt <= 1 else (size - 1) / (cnt - 1)
        pos = 0.0
        for _ in range(cnt):  # the reference accumulates the float position
            out.append(start + round(pos))
            pos = pos + step
        start += size
    return sorted(set(out))


class RefSpacedDiffusion:
    """Respaced linear-schedule diffusion with the official float32 arithmetic on tensors."""

    def __init__(self, spec: str, total: int = 1000):
        full_betas = np.linspace(1e-4 * 1000 / total, 0.02 * 1000 / total, total, dtype=np.float64)
        full_abar = np.cumprod(1.0 - full_betas)
        self.tmap = ref_respacing(total, spec)
        betas, last = [], 1.0
        for t in self.tmap:
            betas.append(1.0 - full_abar[t] / last)
            last = full_abar[t]
        b = np.array(betas, dtype=np.float64)
        self.n = len(b)
        abar = np.cumprod(1.0 - b)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        self.betas = b
        self.abar, self.abar_prev = abar, abar_prev
        self.sr = np.sqrt(1.0 / abar)
        self.srm1 = np.sqrt(1.0 / abar - 1.0)
        pv = b * (1.0 - abar_prev) / (1.0 - abar)
        self.min_log = np.log(np.concatenate([pv[1:2], pv[1:]]))
        self.max_log = np.log(b)
        self.coef1 = b * np.sqrt(abar_prev) / (1.0 - abar)
        self.coef2 = (1.0 - abar_prev) * np.sqrt(1.0 - b) / (1.0 - abar)

    @staticmethod
    def _gather(table: np.ndarray, i: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        v = torch.from_numpy(table)[i].float()
        return v.view(-1, *([1] * (like.dim() - 1))) + torch.zeros_like(like)

    def p_mean_variance(self, model, x, i, model_kwargs):
        """LEARNED_RANGE, eps prediction, no clipping. ``i``: respaced indices (B,)."""
        t_orig = torch.tensor(self.tmap, dtype=torch.long)[i]
        out = model(x, t_orig, **model_kwargs)
        c = x.shape[1]
        eps, v = out[:, :c], out[:, c:]
        lo = self._gather(self.min_log, i, x)
        hi = self._gather(self.max_log, i, x)
        frac = (v + 1) / 2
        log_var = frac * hi + (1 - frac) * lo
        x0 = self._gather(self.sr, i, x) * x - self._gather(self.srm1, i, x) * eps
        mean = self._gather(self.coef1, i, x) * x0 + self._gather(self.coef2, i, x) * x
        return {"mean": mean, "log_variance": log_var, "pred_xstart": x0}

    def p_sample(self, model, x, i, model_kwargs, noise):
        o = self.p_mean_variance(model, x, i, model_kwargs)
        mask = (i != 0).float().view(-1, *([1] * (x.dim() - 1)))
        return o["mean"] + mask * torch.exp(0.5 * o["log_variance"]) * noise

    def ddim_sample(self, model, x, i, model_kwargs, eta=0.0, noise=None):
        o = self.p_mean_variance(model, x, i, model_kwargs)
        x0 = o["pred_xstart"]
        eps = (self._gather(self.sr, i, x) * x - x0) / self._gather(self.srm1, i, x)
        ab = self._gather(self.abar, i, x)
        abp = self._gather(self.abar_prev, i, x)
        sigma = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
        mean = x0 * torch.sqrt(abp) + torch.sqrt(1 - abp - sigma**2) * eps
        if noise is None:
            noise = torch.zeros_like(x)
        mask = (i != 0).float().view(-1, *([1] * (x.dim() - 1)))
        return mean + mask * sigma * noise

    @torch.no_grad()
    def p_sample_loop(self, model, noise, model_kwargs, step_noise):
        """``step_noise(k)`` -> noise for the whole batch at the k-th step (k=0 first)."""
        x = noise
        for k, idx in enumerate(reversed(range(self.n))):
            i = torch.full((x.shape[0],), idx, dtype=torch.long)
            x = self.p_sample(model, x, i, model_kwargs, step_noise(k))
        return x

    @torch.no_grad()
    def ddim_sample_loop(self, model, noise, model_kwargs, eta=0.0, step_noise=None):
        x = noise
        for k, idx in enumerate(reversed(range(self.n))):
            i = torch.full((x.shape[0],), idx, dtype=torch.long)
            x = self.ddim_sample(model, x, i, model_kwargs, eta, None if step_noise is None else step_noise(k))
        return x
