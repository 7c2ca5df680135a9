"""training_losses vs an independent float64 numpy derivation of the official objective; gradient routing; EMA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ditdeploy.models import DiT
from ditdeploy.training import training_losses, update_ema


def _np_std_normal_cdf_tanh(x: np.ndarray) -> np.ndarray:
    # The reference objective specifies this tanh approximation of Phi (not erf): re-derived here in float64.
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def reference_losses(model, x0: np.ndarray, t: np.ndarray, y: np.ndarray, noise: np.ndarray) -> dict[str, np.ndarray]:
    """float64 numpy: linear betas 1e-4..0.02 (1000), q(x_t|x0), posterior, learned-range variance, KL / NLL in bits."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    post_var_clipped = post_var.copy()
    post_var_clipped[0] = post_var[1]

    sh = (-1, 1, 1, 1)
    a, ap, b = abar[t].reshape(sh), abar_prev[t].reshape(sh), betas[t].reshape(sh)
    x_t = np.sqrt(a) * x0 + np.sqrt(1.0 - a) * noise
    with torch.no_grad():
        out = model(torch.from_numpy(x_t.astype(np.float32)), torch.from_numpy(t), torch.from_numpy(y)).double().numpy()
    c = x0.shape[1]
    eps, v = out[:, :c], out[:, c:]
    mse = ((noise - eps) ** 2).reshape(len(t), -1).mean(1)

    # posterior q(x_{t-1} | x_t, x0) and the model's p(x_{t-1} | x_t)
    def post_mean(x_start):
        return (np.sqrt(ap) * b / (1.0 - a)) * x_start + (np.sqrt(alphas[t].reshape(sh)) * (1.0 - ap) / (1.0 - a)) * x_t

    x0_hat = (x_t - np.sqrt(1.0 - a) * eps) / np.sqrt(a)
    mu_q, mu_p = post_mean(x0), post_mean(x0_hat)
    lv_q = np.log(post_var_clipped[t]).reshape(sh)
    frac = (v + 1.0) / 2.0
    lv_p = frac * np.log(b) + (1.0 - frac) * lv_q
    kl = 0.5 * (lv_p - lv_q + (np.exp(lv_q) + (mu_q - mu_p) ** 2) / np.exp(lv_p) - 1.0)
    kl_bits = kl.reshape(len(t), -1).mean(1) / math.log(2.0)

    # discretized Gaussian decoder at t = 0: bins of half-width 1/255, open-ended at the edges
    sd = np.exp(0.5 * lv_p)
    upper = _np_std_normal_cdf_tanh((x0 - mu_p + 1.0 / 255.0) / sd)
    lower = _np_std_normal_cdf_tanh((x0 - mu_p - 1.0 / 255.0) / sd)
    p = np.where(x0 < -0.999, upper, np.where(x0 > 0.999, 1.0 - lower, upper - lower))
    nll_bits = -np.log(np.maximum(p, 1e-12)).reshape(len(t), -1).mean(1) / math.log(2.0)

    vb = np.where(t == 0, nll_bits, kl_bits)
    return {"loss": mse + vb, "mse": mse, "vb": vb}


def _model(in_ch: int = 1, size: int = 8, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    m = DiT(input_size=size, patch_size=2, in_channels=in_ch, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():  # leave the zero init behind so both output halves carry signal
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.mark.parametrize("in_ch", [1, 4])
def test_training_losses_match_independent_float64(in_ch):
    rng = np.random.default_rng(1)
    n = 48
    # digit-like data: exact -1 / +1 (the open edge bins) and values in between
    x0 = rng.integers(0, 17, size=(n, in_ch, 8, 8)).astype(np.float64) / 16.0 * 2.0 - 1.0
    x0 = x0.astype(np.float32).astype(np.float64)
    noise = rng.standard_normal(x0.shape).astype(np.float32).astype(np.float64)
    t = np.concatenate([[0, 0, 0, 1, 2, 10, 500, 998, 999], rng.integers(0, 1000, n - 9)]).astype(np.int64)
    y = rng.integers(0, 11, n).astype(np.int64)  # includes the null class 10
    m = _model(in_ch)
    ref = reference_losses(m, x0, t, y, noise)
    got = training_losses(m, torch.from_numpy(x0).float(), torch.from_numpy(t), torch.from_numpy(y),
                          torch.from_numpy(noise).float())
    for k in ("mse", "vb", "loss"):
        assert got[k].shape == (n,) and got[k].dtype == torch.float32
        g = got[k].detach().double().numpy()
        # float32 arithmetic (coefficients cast to float32, as the reference does) vs float64: relative ~1e-6;
        # the KL at large t is a difference of O(1) terms, so an absolute floor of 2e-6 bits.
        np.testing.assert_allclose(g, ref[k], rtol=2e-5, atol=2e-6, err_msg=k)
    assert (got["vb"][t == 0] > 0).all() and torch.isfinite(got["loss"]).all()
    # the t = 0 rows really are the decoder NLL (a KL at t=0 would be a different number)
    assert not np.allclose(ref["vb"][t == 0], 0.0)


def test_vb_trains_only_the_variance_and_mse_only_eps():
    rng = np.random.default_rng(0)
    x0 = torch.from_numpy(rng.uniform(-1, 1, (8, 1, 8, 8)).astype(np.float32))
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 5, 50, 200, 500, 900, 999])
    y = torch.arange(8)
    out = torch.randn(8, 2, 8, 8, requires_grad=True)
    losses = training_losses(lambda xt, tt, yy: out * 1.0, x0, t, y, noise)
    (g_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    assert torch.count_nonzero(g_vb[:, :1]) == 0  # eps detached in vb
    assert torch.count_nonzero(g_vb[:, 1:]) > 0
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert torch.count_nonzero(g_mse[:, 1:]) == 0
    # d mse / d eps = -2 (noise - eps) / D
    torch.testing.assert_close(g_mse[:, :1], -2.0 * (noise - out[:, :1].detach()) / 64.0)


def test_training_losses_rejects_non_learned_sigma():
    x0 = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="learned-sigma"):
        training_losses(lambda a, b, c: torch.zeros(2, 1, 8, 8), x0, torch.tensor([1, 2]), torch.tensor([0, 1]),
                        torch.zeros_like(x0))


def test_ema_update_formula():
    torch.manual_seed(0)
    a, b = _model(seed=1), _model(seed=2)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    update_ema(a, b, 0.9)
    for k, p in a.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[k] + 0.1 * dict(b.named_parameters())[k], rtol=0, atol=1e-7)
    update_ema(a, b, 0.0)
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q)
