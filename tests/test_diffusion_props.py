"""Property-based tests (hypothesis) for respacing, schedules and the sampler maths (issue 8 item 4)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ditdeploy.diffusion import METHODS, base_schedule, sample, sampling_timesteps, space_timesteps
from ditdeploy.errors import DitDeployError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


@SETTINGS
@given(st.data())
def test_single_section_gives_exactly_n_sorted_unique_steps(data):
    total = data.draw(st.integers(1, 1500), label="T")
    n = data.draw(st.integers(1, total), label="N")
    steps = sorted(space_timesteps(total, str(n)))
    assert len(steps) == n
    assert steps[0] == 0 and steps[-1] <= total - 1
    if n >= 2:
        assert steps[-1] == total - 1
    assert all(a < b for a, b in zip(steps, steps[1:], strict=False))


@SETTINGS
@given(st.integers(1, 1000), st.lists(st.integers(0, 400), min_size=1, max_size=6))
def test_multi_section_count_or_value_error(total, counts):
    k = len(counts)
    sizes = [total // k + (1 if j < total % k else 0) for j in range(k)]
    spec = ",".join(map(str, counts))
    if any(c > s for c, s in zip(counts, sizes, strict=True)):
        with pytest.raises(ValueError):
            space_timesteps(total, spec)
        return
    steps = sorted(space_timesteps(total, spec))
    assert len(steps) == sum(counts)  # sections are disjoint and each keeps exactly its count
    assert all(0 <= s < total for s in steps)
    if counts[0] >= 1:
        assert steps[0] == 0


@SETTINGS
@given(st.integers(2, 1500), st.integers(1, 1500))
def test_ddim_rule_is_an_integer_stride_from_zero_or_a_value_error(total, n):
    try:
        steps = sorted(space_timesteps(total, f"ddim{n}"))
    except ValueError:
        assert all(len(range(0, total, i)) != n for i in range(1, total))
        return
    assert len(steps) == n and steps[0] == 0
    assert len(set(np.diff(steps))) <= 1


@SETTINGS
@given(st.sampled_from(METHODS), st.integers(1, 1000))
def test_sampling_timesteps_exact_count_unique_in_range(method, n):
    ts = sampling_timesteps(method, n)
    assert ts.dtype == np.int64 and len(ts) == n and len(np.unique(ts)) == n
    assert (np.diff(ts) > 0).all() and ts[0] >= 0 and ts[-1] <= 999
    if method != "dpm-solver++" or n >= 2:
        assert ts[0] == 0
    if method == "dpm-solver++":
        assert ts[-1] == 999


@SETTINGS
@given(st.sets(st.integers(0, 999), min_size=1, max_size=300))
def test_respaced_abar_equals_original_at_kept_timesteps(kept):
    r = base_schedule().respace(kept)
    keep = np.array(sorted(kept))
    np.testing.assert_array_equal(r.timestep_map, keep)
    # the respaced betas are ratios of abar and their cumulative product re-forms abar: float64 rounding over up to
    # 1000 factors gives ~1e-12 relative (1.3e-12 seen at kept={0, 997}), so 1e-10 still catches any wrong rule
    np.testing.assert_allclose(r.alphas_cumprod, ABAR[keep], rtol=1e-10)
    assert ((r.betas > 0) & (r.betas <= 1)).all()
    # the respaced posterior is a proper Gaussian: variances in [0, beta], coefficients positive
    assert (r.posterior_variance >= 0).all() and (r.posterior_variance <= r.betas + 1e-15).all()


def _zero(x, t, y):
    return np.zeros_like(x)


X = np.zeros((2, 1, 2, 2), np.float32)
Y = np.zeros(2, np.int64)


@SETTINGS
@given(st.one_of(st.integers(-10**6, 0), st.integers(1001, 10**6)))
def test_sample_rejects_bad_steps(steps):
    with pytest.raises(DitDeployError, match="steps"):
        sample(_zero, X, Y, steps=steps)


@SETTINGS
@given(st.floats(max_value=-1e-12, allow_nan=False) | st.just(float("nan")) | st.just(float("inf")))
def test_sample_rejects_bad_cfg(cfg):
    with pytest.raises(DitDeployError, match="cfg_scale"):
        sample(_zero, X, Y, cfg_scale=cfg, num_classes=10)


@SETTINGS
@given(st.text(max_size=20))
def test_sample_rejects_unknown_methods(method):
    assume(method not in METHODS)
    with pytest.raises(DitDeployError, match="unknown sampler"):
        sample(_zero, X, Y, method=method)


@SETTINGS
@given(st.integers(1, 50), st.lists(st.integers(-5, 60), min_size=2, max_size=2))
def test_sample_label_range(num_classes, labels):
    y = np.array(labels, np.int64)
    if y.min() < 0 or y.max() >= num_classes:
        with pytest.raises(DitDeployError, match="labels"):
            sample(_zero, X, y, steps=1, num_classes=num_classes)
    else:
        sample(_zero, X, y, steps=1, num_classes=num_classes)


@SETTINGS
@given(
    st.floats(-2, 2), st.floats(0.05, 3.0), st.integers(1, 60), st.integers(0, 2**32 - 1),
)
def test_ddim_matches_the_gaussian_closed_form(mu, sd, steps, seed):
    """For N(mu, sd^2) data and the exact eps, DDIM eta=0 is the affine map of the closed form (float32 rounding)."""

    def den(x, t, y):
        ab = ABAR[t].reshape(-1, 1, 1, 1)
        return (np.sqrt(1 - ab) * (x - np.sqrt(ab) * mu) / (ab * sd**2 + 1 - ab)).astype(np.float32)

    x = np.random.default_rng(seed).standard_normal((1, 1, 4, 4)).astype(np.float32)
    kept = sampling_timesteps("ddim", steps)
    z = x.astype(np.float64) - np.sqrt(ABAR[kept[-1]]) * mu
    for j in range(len(kept) - 1, -1, -1):
        ab, abp = ABAR[kept[j]], (ABAR[kept[j - 1]] if j > 0 else 1.0)
        z = z * (np.sqrt(abp * ab) * sd**2 + np.sqrt((1 - abp) * (1 - ab))) / (ab * sd**2 + 1 - ab)
    want = mu + z
    got = sample(den, x, np.zeros(1, np.int64), method="ddim", steps=steps)
    assert np.abs(got - want).max() <= 1e-5 * (abs(mu) + sd + 1)


@SETTINGS
@given(st.sampled_from(METHODS), st.floats(0, 20), st.integers(1, 30), st.booleans())
def test_guidance_is_a_no_op_when_the_denoiser_ignores_the_label(method, cfg, steps, all_channels):
    """uncond + s (cond - uncond) = cond when cond == uncond, for any scale, sampler and channel choice."""

    def den(x, t, y):
        return np.concatenate([0.3 * x + 0.01 * t.reshape(-1, 1, 1, 1) / 1000, np.tanh(x)], axis=1)

    x = np.random.default_rng(0).standard_normal((2, 4, 2, 2)).astype(np.float32)
    y = np.array([1, 2])
    a = sample(den, x, y, method=method, steps=steps, cfg_scale=cfg, num_classes=5, seed=3,
               guide_all_channels=all_channels)
    b = sample(den, x, y, method=method, steps=steps, seed=3)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
