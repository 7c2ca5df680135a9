"""Limited-interval guidance (``cfg_interval``) in ``ditdeploy.diffusion.sample``: equalities with plain guidance and
with conditional-only sampling, the per-step batch actually sent, an independent hand-written mixed sampler, and
one-line errors for bad intervals."""

from __future__ import annotations

import numpy as np
import pytest

from ditdeploy.diffusion import guided_steps, parse_cfg_interval, sample, sampling_timesteps
from ditdeploy.errors import DitDeployError

K_CLS = 10
ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


def den(x, t, y):
    """Label-dependent Gaussian-data eps (rows independent: a B-row call equals the first B rows of a 2B call)."""
    mu = (np.asarray(y, np.float64) - 4.5).reshape(-1, 1, 1, 1) * 0.2
    ab = ABAR[t].reshape(-1, 1, 1, 1)
    eps = np.sqrt(1 - ab) * (x - np.sqrt(ab) * mu) / (ab * 0.5**2 + 1 - ab)
    return np.concatenate([eps, np.tanh(eps) * 0.5 + mu], axis=1).astype(np.float32)


class Counting:
    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, x, t, y):
        self.calls.append((int(x.shape[0]), int(t[0])))
        return den(x, t, y)


@pytest.fixture
def x_T():
    return np.random.default_rng(3).standard_normal((4, 4, 6, 6)).astype(np.float32)


Y = np.array([0, 3, 9, 5])
METHODS = ("ddim", "ddpm", "dpm-solver++")


@pytest.mark.parametrize("method", METHODS)
def test_interval_covering_all_steps_equals_plain_guidance(x_T, method):
    a = sample(den, x_T, Y, method=method, steps=10, cfg_scale=4.0, seed=2, num_classes=K_CLS)
    b = sample(den, x_T, Y, method=method, steps=10, cfg_scale=4.0, seed=2, num_classes=K_CLS, cfg_interval=(0, 999))
    np.testing.assert_array_equal(a, b)  # bit-identical: the same calls in the same order


@pytest.mark.parametrize("method", METHODS)
def test_empty_interval_equals_conditional_only_sampling(x_T, method):
    ts = sampling_timesteps(method, 10)
    lo = int(max(ts)) + 1 if max(ts) < 999 else None
    interval = (lo, 999) if lo is not None else (1, 1)
    assert not any(lo_ <= t <= hi_ for t in ts for lo_, hi_ in [interval]), (ts, interval)
    c = Counting()
    a = sample(c, x_T, Y, method=method, steps=10, cfg_scale=4.0, seed=2, num_classes=K_CLS, cfg_interval=interval)
    b = sample(den, x_T, Y, method=method, steps=10, cfg_scale=1.0, seed=2, num_classes=K_CLS)
    np.testing.assert_array_equal(a, b)
    assert [n for n, _ in c.calls] == [4] * 10  # half the rows at every step
    g = sample(den, x_T, Y, method=method, steps=10, cfg_scale=4.0, seed=2, num_classes=K_CLS)
    assert np.abs(g - b).max() > 1e-2  # guidance really changes the samples (the equality above can fail)


def _hand_mixed(x_T, steps, scale, lo, hi):
    """Independent DDIM(eta=0) loop in float64: guided eps (first 3 channels) inside [lo, hi], cond eps outside."""
    ts = sorted(range(0, 1000, 1000 // steps))
    x = x_T.astype(np.float64)
    for i in reversed(range(len(ts))):
        t = ts[i]
        tt = np.full(len(Y), t)
        c = den(x.astype(np.float32), tt, Y).astype(np.float64)[:, :4]
        if lo <= t <= hi:
            u = den(x.astype(np.float32), tt, np.full_like(Y, K_CLS)).astype(np.float64)[:, :4]
            c[:, :3] = u[:, :3] + scale * (c[:, :3] - u[:, :3])
        ab, ab_prev = ABAR[t], (ABAR[ts[i - 1]] if i > 0 else 1.0)
        x0 = (x - np.sqrt(1 - ab) * c) / np.sqrt(ab)
        x = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev) * c
    return x


def test_partial_interval_matches_an_independent_loop_and_sends_half_batches_outside(x_T):
    c = Counting()
    a = sample(c, x_T, Y, method="ddim", steps=10, cfg_scale=4.0, num_classes=K_CLS, cfg_interval="150,750")
    ref = _hand_mixed(x_T, 10, 4.0, 150, 750)
    assert np.linalg.norm(a - ref) / np.linalg.norm(ref) < 1e-5  # float32 sampler vs float64 loop
    assert c.calls == [(8 if 150 <= t <= 750 else 4, t) for t in range(900, -1, -100)]
    full = sample(den, x_T, Y, method="ddim", steps=10, cfg_scale=4.0, num_classes=K_CLS)
    assert np.abs(a - full).max() > 1e-3


def test_guided_steps_and_interval_bounds_are_inclusive():
    ts = [900, 750, 150, 149, 0]
    assert guided_steps(ts, 4.0, (150, 750)) == [False, True, True, False, False]
    assert guided_steps(ts, 4.0, None) == [True] * 5
    assert guided_steps(ts, 1.0, (0, 999)) == [False] * 5
    assert parse_cfg_interval("150, 750") == (150, 750)
    assert parse_cfg_interval((0, 999)) == (0, 999)
    assert parse_cfg_interval(None) is None and parse_cfg_interval("") is None


@pytest.mark.parametrize("bad", ["750,150", "-1,500", "0,1000", "1,2,3", "a,b", "150", (1.5, 2), [True, 3], 7])
def test_bad_intervals_are_one_line_errors(x_T, bad):
    with pytest.raises(DitDeployError) as e:
        sample(den, x_T, Y, cfg_scale=4.0, steps=2, num_classes=K_CLS, cfg_interval=bad)
    assert "\n" not in str(e.value) and "interval" in str(e.value)
