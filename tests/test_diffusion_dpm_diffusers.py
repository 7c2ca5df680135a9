"""Cross-check of ``dpmpp_2m`` against an independent implementation: diffusers' DPMSolverMultistepScheduler.

Same timesteps (ours), linear betas 1e-4..0.02, ``algorithm_type="dpmsolver++"``, order 2, final step to sigma=0
(diffusers then takes that last step first-order, as we do). diffusers runs in float64 here, ours in float32, so
the tolerance is float32 rounding through the steps: rel-L2 <= 1e-5 (measured ~1-2e-6).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import torch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy-2 __array__ note inside diffusers

from ditdeploy.diffusion import base_schedule, dpmpp_2m, sampling_timesteps  # noqa: E402

ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


def _gaussian_eps(x: np.ndarray, t: int, mu: float = 0.5, sd: float = 0.3) -> np.ndarray:
    ab = ABAR[t]
    return np.sqrt(1 - ab) * (x - np.sqrt(ab) * mu) / (ab * sd**2 + 1 - ab)


@pytest.mark.parametrize("steps", [5, 10, 25])
def test_dpmpp_2m_matches_diffusers(steps):
    ts = sampling_timesteps("dpm-solver++", steps)[::-1]
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        algorithm_type="dpmsolver++", solver_order=2, lower_order_final=False, final_sigmas_type="zero",
        euler_at_final=False,
    )
    sched.set_timesteps(timesteps=[int(t) for t in ts])
    assert [int(t) for t in sched.timesteps] == [int(t) for t in ts]
    x_t = np.random.default_rng(steps).standard_normal((2, 4, 8, 8)).astype(np.float32)
    x = torch.from_numpy(x_t).double()
    for t in sched.timesteps:
        eps = torch.from_numpy(_gaussian_eps(x.numpy(), int(t)))
        x = sched.step(eps, t, x).prev_sample
    want = x.numpy()
    got = dpmpp_2m(lambda x, k, t: _gaussian_eps(x, t).astype(np.float32), x_t, base_schedule(), ts)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
