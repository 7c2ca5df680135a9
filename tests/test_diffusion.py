"""ditdeploy.diffusion: schedule, respacing, samplers against closed forms, sample() API and validation."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ditdeploy.diffusion import (
    GaussianSchedule,
    base_schedule,
    dpmpp_2m,
    linear_betas,
    sample,
    sampling_timesteps,
    space_timesteps,
    spacing_rule,
)
from ditdeploy.errors import DitDeployError, NumericsError

T = 1000
# Independent float64 tables (not from the package): linear betas, abar.
BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)
ABAR = np.cumprod(1.0 - BETAS)


# --------------------------------------------------------------------------------------------------- schedule
def test_linear_schedule_tables():
    s = base_schedule()
    assert s.num_timesteps == T and s.betas.dtype == np.float64
    np.testing.assert_array_equal(s.betas, BETAS)
    np.testing.assert_allclose(s.alphas_cumprod, ABAR, rtol=1e-14)
    assert s.betas[0] == 1e-4 and s.betas[-1] == pytest.approx(0.02, rel=1e-15)
    assert s.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-3)  # abar_999 of the linear schedule
    np.testing.assert_allclose(s.alphas_cumprod_prev, np.append(1.0, ABAR[:-1]))
    np.testing.assert_allclose(s.sqrt_recip_alphas_cumprod, 1 / np.sqrt(ABAR), rtol=1e-13)
    np.testing.assert_allclose(s.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / ABAR - 1), rtol=1e-12)
    pv = BETAS * (1 - np.append(1.0, ABAR[:-1])) / (1 - ABAR)
    np.testing.assert_allclose(s.posterior_variance, pv, rtol=1e-12)
    assert s.posterior_variance[0] == 0.0
    np.testing.assert_allclose(s.posterior_log_variance_clipped, np.log(np.append(pv[1], pv[1:])), rtol=1e-12)
    np.testing.assert_allclose(s.log_betas, np.log(BETAS))
    # posterior mean of q(x_{t-1} | x_t, x_0) from Bayes' rule, checked at a few t
    for t in (1, 10, 500, 999):
        ab, abp = ABAR[t], ABAR[t - 1]
        c1 = np.sqrt(abp) * BETAS[t] / (1 - ab)
        c2 = np.sqrt(1 - BETAS[t]) * (1 - abp) / (1 - ab)
        assert s.posterior_mean_coef1[t] == pytest.approx(c1, rel=1e-12)
        assert s.posterior_mean_coef2[t] == pytest.approx(c2, rel=1e-12)


def test_respace_keeps_abar_and_maps_to_original_timesteps():
    keep = sorted(space_timesteps(T, "ddim10"))
    r = base_schedule().respace(keep)
    assert r.num_timesteps == 10
    np.testing.assert_array_equal(r.timestep_map, keep)
    np.testing.assert_allclose(r.alphas_cumprod, ABAR[keep], rtol=1e-12)
    np.testing.assert_allclose(r.betas, 1 - ABAR[keep] / np.append(1.0, ABAR[keep][:-1]), rtol=1e-12)
    rr = r.respace([0, 5, 9])  # composes: the map still refers to original timesteps
    np.testing.assert_array_equal(rr.timestep_map, [0, 500, 900])
    with pytest.raises(ValueError):
        base_schedule().respace([])
    with pytest.raises(ValueError):
        base_schedule().respace([1000])
    with pytest.raises(ValueError):
        GaussianSchedule([0.1, 1.5])
    assert linear_betas(100)[-1] == pytest.approx(0.2)  # the official "linear" scaling by 1000 / T


# --------------------------------------------------------------------------------------------------- respacing
def test_space_timesteps_250_and_ddim():
    s250 = sorted(space_timesteps(T, "250"))
    assert len(s250) == 250 and s250[:5] == [0, 4, 8, 12, 16] and s250[-2:] == [995, 999]
    assert sorted(space_timesteps(T, "ddim10")) == list(range(0, 1000, 100))
    assert sorted(space_timesteps(T, "ddim25")) == list(range(0, 1000, 40))
    assert sorted(space_timesteps(T, "ddim50")) == list(range(0, 1000, 20))
    assert space_timesteps(T, "1000") == set(range(1000)) == space_timesteps(T, "ddim1000")
    assert space_timesteps(T, "1") == {0}
    assert space_timesteps(T, [10]) == space_timesteps(T, "10")


def test_space_timesteps_accumulates_the_float_position_like_the_reference():
    # 10 * (999/20) is 499.5 exactly (round-half-even -> 500) but the accumulated position is 499.4999... -> 499.
    s21 = space_timesteps(T, "21")
    assert 499 in s21 and 500 not in s21 and len(s21) == 21


def test_space_timesteps_multi_section():
    got = sorted(space_timesteps(300, "10,15,20"))
    assert got == [
        0, 11, 22, 33, 44, 55, 66, 77, 88, 99,
        100, 107, 114, 121, 128, 135, 142, 149, 157, 164, 171, 178, 185, 192, 199,
        200, 205, 210, 216, 221, 226, 231, 236, 242, 247, 252, 257, 263, 268, 273, 278, 283, 289, 294, 299,
    ]  # section 2, k=7: 7 * 99/14 accumulates to 49.4999... -> 149
    assert sorted(space_timesteps(10, "2,3")) == [0, 4, 5, 7, 9]  # 10 = 5 + 5 steps


@pytest.mark.parametrize(
    "spec,num", [("ddim1", 1000), ("ddim999", 1000), ("1001", 1000), ("101,1,1", 300), ("x", 1000), ("ddimx", 1000)]
)
def test_space_timesteps_errors(spec, num):
    with pytest.raises(ValueError):
        space_timesteps(num, spec)


def test_sampling_timesteps_rules():
    assert spacing_rule("ddim", 10) == "ddim10"
    assert spacing_rule("ddim", 999) == "999"  # no integer stride gives 999 steps: documented fallback
    assert len(sampling_timesteps("ddim", 999)) == 999
    assert spacing_rule("ddpm", 250) == "250"
    np.testing.assert_array_equal(sampling_timesteps("ddim", 10), np.arange(0, 1000, 100))
    dpm = sampling_timesteps("dpm-solver++", 10)
    assert dpm[0] == 0 and dpm[-1] == 999 and len(np.unique(dpm)) == 10
    step = -np.diff(0.5 * np.log(ABAR / (1 - ABAR))[dpm])  # uniform in log-SNR up to integer rounding
    assert step.min() > 0.95 * step.mean() and step.max() < 1.05 * step.mean()  # measured 0.979 / 1.023
    np.testing.assert_array_equal(sampling_timesteps("dpm-solver++", 1), [999])
    with pytest.raises(ValueError):
        sampling_timesteps("euler", 10)


# --------------------------------------------------------------------------------------------------- closed forms
# Data x0 ~ N(mu, s^2) per element (per channel here). x_t ~ N(sqrt(abar) mu, v), v = abar s^2 + 1 - abar, and the
# exact eps predictor is E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / v.
MU = np.array([0.5, -0.2, 0.0, 1.0]).reshape(1, 4, 1, 1)
SD = np.array([0.3, 1.0, 0.1, 0.6]).reshape(1, 4, 1, 1)


def gaussian_denoiser(mu=MU, sd=SD, learned_v: float | None = None):
    def denoiser(x, t, y):
        ab = ABAR[t].reshape(-1, 1, 1, 1)
        eps = np.sqrt(1 - ab) * (x - np.sqrt(ab) * mu) / (ab * sd**2 + 1 - ab)
        if learned_v is not None:
            eps = np.concatenate([eps, np.full_like(eps, learned_v)], axis=1)
        return eps.astype(np.float32)

    denoiser.num_classes = 10
    return denoiser


def ddim_closed_form(x_t, kept, mu=MU, sd=SD):
    """DDIM eta=0 with the exact eps is affine per element: z <- z (sqrt(ab' ab) s^2 + sqrt((1-ab')(1-ab))) / v."""
    z = x_t.astype(np.float64) - np.sqrt(ABAR[kept[-1]]) * mu
    for j in range(len(kept) - 1, -1, -1):
        ab, abp = ABAR[kept[j]], (ABAR[kept[j - 1]] if j > 0 else 1.0)
        v = ab * sd**2 + 1 - ab
        z = z * (np.sqrt(abp * ab) * sd**2 + np.sqrt((1 - abp) * (1 - ab))) / v
    return np.sqrt(abp) * mu + z


def ode_limit(x_t, mu=MU, sd=SD):
    """Exact probability-flow map from t=999 to t=0 (z / sqrt(v) is invariant), then the x0 prediction at t=0."""
    v_t, v_0 = ABAR[-1] * sd**2 + 1 - ABAR[-1], ABAR[0] * sd**2 + 1 - ABAR[0]
    z0 = (x_t.astype(np.float64) - np.sqrt(ABAR[-1]) * mu) * np.sqrt(v_0 / v_t)
    return mu + z0 * np.sqrt(ABAR[0]) * sd**2 / v_0


@pytest.fixture(scope="module")
def x_T():
    return np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("steps", [1, 10, 25, 50, 999])
def test_ddim_eta0_equals_closed_form(x_T, steps):
    y = np.zeros(len(x_T), np.int64)
    got = sample(gaussian_denoiser(), x_T, y, method="ddim", steps=steps)
    want = ddim_closed_form(x_T, sampling_timesteps("ddim", steps))
    assert got.dtype == np.float32
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5  # float32 rounding only


def test_ddim_approaches_the_ode_solution(x_T):
    y = np.zeros(len(x_T), np.int64)
    exact = ode_limit(x_T)
    errs = [np.linalg.norm(sample(gaussian_denoiser(), x_T, y, steps=n) - exact) for n in (10, 50, 1000)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] / np.linalg.norm(exact - MU) < 0.01  # DDIM-1000 is within 1% of the exact ODE map


def test_dpm_solver_converges_to_ddim1000_and_the_ode_limit(x_T):
    y = np.zeros(len(x_T), np.int64)
    den = gaussian_denoiser()
    exact = ode_limit(x_T)
    scale = np.linalg.norm(exact - MU)
    ddim1000 = sample(den, x_T, y, method="ddim", steps=1000)
    e_ode, e_ddim = [], []
    for n in (5, 10, 20, 50, 100):
        out = sample(den, x_T, y, method="dpm-solver++", steps=n)
        e_ode.append(np.linalg.norm(out - exact) / scale)
        e_ddim.append(np.linalg.norm(out - ddim1000) / scale)
    assert all(a > b for a, b in zip(e_ode, e_ode[1:], strict=False)), e_ode
    assert all(a > b for a, b in zip(e_ddim[:3], e_ddim[1:4], strict=True)), e_ddim  # until DDIM-1000's own ~0.4% error
    assert e_ode[2] < 0.03 and e_ode[4] < 2e-3, e_ode  # measured 0.014 (20 steps), 6e-4 (100 steps)
    assert e_ode[3] / e_ode[4] > 3  # second order: halving the step cuts the error ~4x (measured 4.0)
    dd20 = np.linalg.norm(sample(den, x_T, y, method="ddim", steps=20) - exact) / scale
    assert e_ode[2] < dd20 / 3  # and it beats DDIM at equal evaluations


def test_dpm_solver_matches_a_float64_transcription(x_T):
    """Independent float64 DPM-Solver++(2M) written from the paper's update rule."""
    den = gaussian_denoiser()
    ts = sampling_timesteps("dpm-solver++", 8)[::-1]
    a, s = np.sqrt(ABAR[ts]), np.sqrt(1 - ABAR[ts])
    lam = np.log(a / s)
    x = x_T.astype(np.float64)
    prev = None
    for k, t in enumerate(ts):
        x0 = (x - s[k] * den(x, np.full(len(x), t), None).astype(np.float64)) / a[k]
        if k == len(ts) - 1:
            x = x0
            break
        h = lam[k + 1] - lam[k]
        d = x0 if prev is None else x0 + (x0 - prev) * h / (2 * (lam[k] - lam[k - 1]))
        x = s[k + 1] / s[k] * x + a[k + 1] * (1 - np.exp(-h)) * d
        prev = x0
    got = dpmpp_2m(lambda x, k, t: den(x, np.full(len(x), t), None), x_T, base_schedule(), ts)
    assert np.linalg.norm(got - x) / np.linalg.norm(x) < 1e-5


def _gaussian_ddpm_moments(kept, mu, sd, variance):
    """Exact mean/variance of DDPM's output under the exact eps (each step is affine + Gaussian noise)."""
    m, var = np.zeros_like(mu * sd), np.ones_like(mu * sd)
    for j in range(len(kept) - 1, -1, -1):
        ab, abp = ABAR[kept[j]], (ABAR[kept[j - 1]] if j > 0 else 1.0)
        beta = 1 - ab / abp
        v = ab * sd**2 + 1 - ab
        c1, c2 = beta * np.sqrt(abp) / (1 - ab), (1 - abp) * np.sqrt(1 - beta) / (1 - ab)
        gain = c1 * np.sqrt(ab) * sd**2 / v + c2  # x0_hat = mu (1 - ab s^2 / v) + x sqrt(ab) s^2 / v
        m, var = gain * m + c1 * mu * (1 - ab * sd**2 / v), gain**2 * var
        if j > 0:  # noise: log_var at index j >= 1 uses the unclipped posterior variance pv_j
            pv = beta * (1 - abp) / (1 - ab)
            # learned v = 0 -> frac 1/2: geometric mean of beta and pv; "large": beta (index >= 1)
            var = var + (np.sqrt(beta * pv) if variance == "learned0" else beta)
    return m, var


@pytest.mark.parametrize("variance", ["learned0", "large"])
def test_ddpm_output_statistics(variance):
    """Many samples: mean and std match the exact output law (5 standard errors) and that law is ~N(mu, s^2)."""
    mu = np.array([0.5, -1.0]).reshape(1, 2, 1, 1)
    sd = np.array([0.3, 1.5]).reshape(1, 2, 1, 1)
    den = gaussian_denoiser(mu, sd, learned_v=0.0 if variance == "learned0" else None)
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((256, 2, 8, 8)).astype(np.float32)  # 16384 iid samples per channel
    out = sample(den, noise, np.zeros(256, np.int64), method="ddpm", steps=100, rng=rng)
    n = out.shape[0] * 64
    m_exact, v_exact = _gaussian_ddpm_moments(sampling_timesteps("ddpm", 100), mu, sd, variance)
    mean = out.mean(axis=(0, 2, 3)).reshape(1, 2, 1, 1)
    std = out.std(axis=(0, 2, 3)).reshape(1, 2, 1, 1)
    se_mean, se_std = np.sqrt(v_exact / n), np.sqrt(v_exact / (2 * n))
    assert (np.abs(mean - m_exact) < 5 * se_mean).all(), (mean, m_exact)
    assert (np.abs(std - np.sqrt(v_exact)) < 5 * se_std).all(), (std, np.sqrt(v_exact))
    # the sampler's own bias at 100 steps (exact law, not sampling noise): measured mean error <= 1e-4 and std
    # 3.6% (learned v=0, s=0.3) / 2.1% (s=1.5) low, 1-2% high with the fixed-large variance
    assert np.abs(m_exact - mu).max() < 1e-3 and (np.abs(np.sqrt(v_exact) / sd - 1) < 0.05).all()


@pytest.mark.parametrize("steps", [50, 250])
def test_ddim_output_statistics(steps):
    """DDIM eta=0 maps N(0, 1) affinely: sample mean/std match that law (5 standard errors), which nears N(mu, s^2)."""
    mu = np.array([0.5, -1.0]).reshape(1, 2, 1, 1)
    sd = np.array([0.3, 1.5]).reshape(1, 2, 1, 1)
    noise = np.random.default_rng(4).standard_normal((256, 2, 8, 8)).astype(np.float32)
    out = sample(gaussian_denoiser(mu, sd), noise, np.zeros(256, np.int64), method="ddim", steps=steps)
    n = out.shape[0] * 64
    kept = sampling_timesteps("ddim", steps)
    b = ddim_closed_form(np.zeros((1, 2, 1, 1)), kept, mu, sd)
    gain = ddim_closed_form(np.ones((1, 2, 1, 1)), kept, mu, sd) - b  # law: N(b, gain^2)
    mean = out.mean(axis=(0, 2, 3)).reshape(1, 2, 1, 1)
    std = out.std(axis=(0, 2, 3)).reshape(1, 2, 1, 1)
    assert (np.abs(mean - b) < 5 * gain / np.sqrt(n)).all()
    assert (np.abs(std - gain) < 5 * gain / np.sqrt(2 * n)).all()
    # Sampler bias (exact law vs data), measured: mean off by ~0.01 for mu=-1, s=1.5 (x_T ~ N(0, 1) instead of the
    # true N(sqrt(abar_999) mu, ~1), carried through the deterministic map); std 8.3%/3.1% low at 50 steps,
    # 1.8%/0.6% at 250.
    assert np.abs(b - mu).max() < 0.015
    assert (np.abs(gain / sd - 1) < (0.1 if steps == 50 else 0.025)).all()


# --------------------------------------------------------------------------------------------------- CFG
def test_cfg_combines_eps_channels_like_forward_with_cfg(x_T):
    """Label-dependent Gaussian data; guidance inside sample() == a hand-guided denoiser run without guidance."""
    k_cls = 10

    def cond_mu(y):
        return (np.asarray(y, np.float64) - 4.5).reshape(-1, 1, 1, 1) * 0.2  # null class (10) -> 1.1

    def den(x, t, y):
        ab = ABAR[t].reshape(-1, 1, 1, 1)
        eps = np.sqrt(1 - ab) * (x - np.sqrt(ab) * cond_mu(y)) / (ab * SD**2 + 1 - ab)
        var_ch = np.tanh(eps) * 0.5 + cond_mu(y)  # variance values that also depend on the label
        return np.concatenate([eps, var_ch], axis=1).astype(np.float32)

    def guided_by_hand(s, k):
        def g(x, t, y):
            c, u = den(x, t, y), den(x, t, np.full_like(y, k_cls))
            out = c.copy()
            out[:, :k] = u[:, :k] + np.float32(s) * (c[:, :k] - u[:, :k])
            return out

        return g

    y = np.array([0, 3, 9, 5])
    calls = []

    def counting(x, t, yy):
        calls.append((x.shape[0], yy.copy()))
        return den(x, t, yy)

    for method in ("ddim", "ddpm", "dpm-solver++"):
        for all_ch, k in ((False, 3), (True, 4)):
            a = sample(counting, x_T, y, method=method, steps=8, cfg_scale=3.0, seed=1, num_classes=k_cls,
                       guide_all_channels=all_ch)
            b = sample(guided_by_hand(3.0, k), x_T, y, method=method, steps=8, seed=1, num_classes=k_cls)
            assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-6, (method, all_ch)
    assert all(n == 8 for n, _ in calls)  # one 2B-batch call per step
    np.testing.assert_array_equal(calls[0][1], [0, 3, 9, 5, 10, 10, 10, 10])
    # channel 3 is guided only with guide_all_channels: the two settings really differ
    a3 = sample(den, x_T, y, cfg_scale=3.0, steps=8, num_classes=k_cls)
    a4 = sample(den, x_T, y, cfg_scale=3.0, steps=8, num_classes=k_cls, guide_all_channels=True)
    np.testing.assert_array_equal(a3[:, :3], a4[:, :3])
    assert np.abs(a3[:, 3] - a4[:, 3]).max() > 1e-2


def test_cfg_needs_num_classes(x_T):
    den = gaussian_denoiser()
    del den.num_classes
    with pytest.raises(DitDeployError, match="num_classes"):
        sample(den, x_T, np.zeros(4, np.int64), cfg_scale=4.0, steps=2)
    sample(den, x_T, np.zeros(4, np.int64), cfg_scale=1.0, steps=2)  # no guidance: not needed

    class NoNull:
        config = type("Cfg", (), {"num_classes": 10, "class_dropout_prob": 0.0})()

        def __call__(self, x, t, y):
            return np.zeros_like(x)

    with pytest.raises(DitDeployError, match="null class"):
        sample(NoNull(), x_T, np.zeros(4, np.int64), cfg_scale=4.0, steps=2)
    sample(NoNull(), x_T, np.zeros(4, np.int64), steps=2)


# --------------------------------------------------------------------------------------------------- API behaviour
@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_seed_determinism(x_T, method):
    den = gaussian_denoiser()
    kw = dict(method=method, steps=10, eta=1.0 if method == "ddim" else 0.0)
    y = np.zeros(4, np.int64)
    a = sample(den, x_T, y, seed=7, **kw)
    b = sample(den, x_T, y, seed=7, **kw)
    c = sample(den, x_T, y, seed=8, **kw)
    d = sample(den, x_T, y, rng=np.random.default_rng(7), **kw)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, d)
    assert np.abs(a - c).max() > 1e-2


def test_callback_sees_every_step_and_input_is_not_modified(x_T):
    seen = []
    before = x_T.copy()
    out = sample(gaussian_denoiser(), x_T, np.zeros(4, np.int64), steps=10,
                 callback=lambda k, t, x: seen.append((k, t, x)))
    assert [k for k, _, _ in seen] == list(range(10))
    assert [t for _, t, _ in seen] == list(range(900, -1, -100))
    np.testing.assert_array_equal(seen[-1][2], out)
    assert len({id(x) for _, _, x in seen}) == 10  # fresh arrays: callers may keep them
    np.testing.assert_array_equal(x_T, before)


def test_denoiser_sees_original_timesteps_and_int64(x_T):
    seen = []

    def den(x, t, y):
        assert x.dtype == np.float32 and t.dtype == np.int64 and y.dtype == np.int64
        seen.append(int(t[0]))
        return np.zeros_like(x)

    sample(den, x_T, np.zeros(4, np.int64), method="ddpm", steps=250, seed=0)
    assert seen == sorted(space_timesteps(T, "250"), reverse=True)


def test_nan_detection_names_denoiser_and_step(x_T):
    class Engine:
        name = "xl2-fp16.plan"

        def __call__(self, x, t, y):
            out = np.zeros_like(x)
            if t[0] == 700:
                out[0, 0, 0, 0] = np.nan
            return out

    with pytest.raises(NumericsError) as ei:
        sample(Engine(), x_T, np.zeros(4, np.int64), steps=10)
    msg = str(ei.value)
    assert "xl2-fp16.plan" in msg and "step 3/10" in msg and "t=700" in msg and "\n" not in msg

    def inf_fn(x, t, y):
        return np.full_like(x, np.inf)

    with pytest.raises(NumericsError, match="inf_fn"):
        sample(inf_fn, x_T, np.zeros(4, np.int64), method="dpm-solver++", steps=3)


def test_progress_bar(x_T, capsys):
    sample(gaussian_denoiser(), x_T, np.zeros(4, np.int64), steps=5, progress=True)
    assert "5/5" in capsys.readouterr().err


def _ok(x, t, y):
    return np.zeros_like(x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="euler"), "unknown sampler 'euler': choose one of ddim, ddpm, dpm-solver\\+\\+"),
        (dict(steps=0), "steps"),
        (dict(steps=1001), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(cfg_scale=float("nan")), "cfg_scale"),
        (dict(eta=-0.1), "eta"),
        (dict(method="ddpm", eta=0.5), "eta"),
        (dict(seed=1, rng=np.random.default_rng(1)), "seed or rng"),
        (dict(labels=np.array([0, 1, 2])), "labels"),
        (dict(labels=np.array([0.0, 1.0, 2.0, 3.0])), "labels"),
        (dict(labels=np.array([0, 1, 2, 10]), num_classes=10), "0..9"),
        (dict(labels=np.array([0, -1, 2, 3])), "labels"),
        (dict(noise=np.zeros((4, 8, 8), np.float32)), "noise"),
        (dict(noise=np.zeros((4, 4, 8, 8), np.int32)), "noise"),
        (dict(noise=np.full((4, 4, 8, 8), np.nan, np.float32)), "NaN"),
        (dict(denoiser=lambda x, t, y: np.zeros((4, 5, 8, 8), np.float32)), "returned shape"),
        (dict(denoiser=lambda x, t, y: np.zeros((4, 4, 4, 4), np.float32)), "returned shape"),
        (dict(denoiser="model.onnx"), "callable"),
    ],
)
def test_bad_inputs_raise_one_line_errors(x_T, kwargs, match):
    args = dict(denoiser=_ok, noise=x_T, labels=np.zeros(4, np.int64))
    for k in ("denoiser", "noise", "labels"):
        if k in kwargs:
            args[k] = kwargs.pop(k)
    with pytest.raises(DitDeployError, match=match) as ei:
        sample(args["denoiser"], args["noise"], args["labels"], **kwargs)
    assert "\n" not in str(ei.value)


def test_learned_sigma_output_accepted_and_float64_output_cast(x_T):
    out = sample(gaussian_denoiser(learned_v=0.0), x_T, np.zeros(4, np.int64), method="ddpm", steps=5, seed=0)
    assert out.dtype == np.float32 and out.shape == x_T.shape
    out = sample(lambda x, t, y: np.zeros(x.shape, np.float64), x_T, np.zeros(4, np.int64), steps=3)
    assert out.dtype == np.float32


def test_clip_denoised(x_T):
    big = (x_T * 50).astype(np.float32)
    y = np.zeros(4, np.int64)
    for method in ("ddim", "ddpm", "dpm-solver++"):
        out = sample(_ok, big, y, method=method, steps=5, seed=0, clip_denoised=True)
        assert np.abs(out).max() <= 1.0 + 1e-6  # last step returns the clipped x0
        assert np.abs(sample(_ok, big, y, method=method, steps=5, seed=0)).max() > 1.5


def test_import_and_sample_without_torch():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        import ditdeploy.diffusion as d
        x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
        den = lambda x, t, y: np.concatenate([0.1 * x, np.zeros_like(x)], axis=1)
        for m in d.METHODS:
            out = d.sample(den, x, np.array([1, 2]), method=m, steps=4, cfg_scale=2.0, num_classes=10, seed=0)
            assert out.shape == x.shape and np.isfinite(out).all()
        assert not any(k == "torch" or k.startswith("torch.") for k, v in sys.modules.items() if v is not None)
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
