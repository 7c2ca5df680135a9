"""Parity of ``ditdeploy.diffusion.sample`` with the official DiT sampling loops, on a tiny random DiT.

The official loops are re-implemented in ``tests/official_diffusion_ref.py`` (torch, float32 tensors, float64 tables);
the model is the reference ``ditdeploy.models.DiT`` with its zero-initialised layers perturbed so that its output
(eps and the learned-range variance values) is non-trivial.

Acceptance (issue 2): DDIM, 10 steps ("ddim10"), eta 0, cfg 4.0 on ``forward_with_cfg`` from the same noise -> rel-L2
<= 1e-4. The two implementations evaluate the same formulas in a different order in float32 (e.g. the reference
re-derives eps from x_0), so they differ by float32 rounding amplified through the steps (~1e-6 measured); 1e-4 is
the issue's bound. The DDPM full loop shares the per-step noise through ``sample(noise_fn=...)``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from official_diffusion_ref import RefSpacedDiffusion  # noqa: E402

from ditdeploy.diffusion import sample  # noqa: E402
from ditdeploy.models import DiT  # noqa: E402
from ditdeploy.proof.distances import rel_l2  # noqa: E402

NUM_CLASSES = 10
B = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """A tiny model on a shared 2-core machine: intra-op threads only add contention (0.45 s vs 0.01 s/forward)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(_one_thread) -> DiT:
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=NUM_CLASSES)
    with torch.no_grad():  # adaLN-Zero and the output layer start at zero: perturb them
        for blk in m.blocks:
            blk.adaLN_modulation[-1].weight.normal_(0, 0.05)
            blk.adaLN_modulation[-1].bias.normal_(0, 0.05)
        m.final_layer.adaLN_modulation[-1].weight.normal_(0, 0.05)
        m.final_layer.linear.weight.normal_(0, 0.1)
        m.final_layer.linear.bias.normal_(0, 0.05)
    return m.eval()


def numpy_denoiser(model: DiT):
    def denoiser(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()

    denoiser.num_classes = NUM_CLASSES
    return denoiser


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((B, 4, 8, 8)).astype(np.float32)
    y = np.array([1, 7, 3], dtype=np.int64)
    return z, y


def _cfg_kwargs(y: np.ndarray, scale: float) -> dict:
    y2 = torch.cat([torch.from_numpy(y), torch.full((len(y),), NUM_CLASSES, dtype=torch.long)])
    return {"y": y2, "cfg_scale": scale}


def test_model_output_is_nontrivial(model, inputs):
    z, y = inputs
    out = numpy_denoiser(model)(z, np.full(B, 500, np.int64), y)
    assert out.shape == (B, 8, 8, 8)
    assert out[:, :4].std() > 0.05 and out[:, 4:].std() > 0.05  # eps and variance values both vary


def test_ddim10_cfg4_matches_official_ddim_sample_loop(model, inputs):
    z, y = inputs
    zt = torch.from_numpy(z)
    ref = RefSpacedDiffusion("ddim10").ddim_sample_loop(
        model.forward_with_cfg, torch.cat([zt, zt]), _cfg_kwargs(y, 4.0)
    )[:B].numpy()
    ours = sample(numpy_denoiser(model), z, y, method="ddim", steps=10, cfg_scale=4.0)
    err = rel_l2(ours, ref)
    assert ours.dtype == np.float32 and ours.shape == z.shape
    assert err <= 1e-4, err
    assert rel_l2(ours, z) > 0.1  # the loop really moved away from the noise


def test_ddim_unguided_eta_half_matches_reference_with_shared_noise(model, inputs):
    z, y = inputs
    rng = np.random.default_rng(5)
    steps = [rng.standard_normal(z.shape).astype(np.float32) for _ in range(10)]
    ref = RefSpacedDiffusion("ddim10").ddim_sample_loop(
        lambda x, t, y: model(x, t, y), torch.from_numpy(z), {"y": torch.from_numpy(y)}, eta=0.5,
        step_noise=lambda k: torch.from_numpy(steps[k]),
    ).numpy()
    ours = sample(numpy_denoiser(model), z, y, method="ddim", steps=10, eta=0.5, noise_fn=lambda k, shape: steps[k])
    assert rel_l2(ours, ref) <= 1e-4


@pytest.mark.parametrize("cfg", [1.0, 1.5])
def test_ddpm25_full_loop_matches_official_p_sample_loop(model, inputs, cfg):
    z, y = inputs
    rng = np.random.default_rng(2)
    n = 25
    steps = [rng.standard_normal(z.shape).astype(np.float32) for _ in range(n)]
    other = [rng.standard_normal(z.shape).astype(np.float32) for _ in range(n)]  # noise of the discarded half
    zt = torch.from_numpy(z)
    if cfg == 1.0:
        ref = RefSpacedDiffusion("25").p_sample_loop(
            lambda x, t, y: model(x, t, y), zt, {"y": torch.from_numpy(y)},
            step_noise=lambda k: torch.from_numpy(steps[k]),
        ).numpy()
    else:
        ref = RefSpacedDiffusion("25").p_sample_loop(
            model.forward_with_cfg, torch.cat([zt, zt]), _cfg_kwargs(y, cfg),
            step_noise=lambda k: torch.from_numpy(np.concatenate([steps[k], other[k]])),
        )[:B].numpy()
    ours = sample(
        numpy_denoiser(model), z, y, method="ddpm", steps=n, cfg_scale=cfg, noise_fn=lambda k, shape: steps[k]
    )
    assert rel_l2(ours, ref) <= 1e-4


def test_one_ddpm_step_mean_and_std_match_p_mean_variance(model, inputs):
    """First DDPM step of "250" with zero noise gives the mean; with unit noise mean + exp(log_var / 2)."""
    z, y = inputs
    ref = RefSpacedDiffusion("250")
    i = torch.full((2 * B,), ref.n - 1, dtype=torch.long)
    with torch.no_grad():
        o = ref.p_mean_variance(model.forward_with_cfg, torch.cat([torch.from_numpy(z)] * 2), i, _cfg_kwargs(y, 4.0))
    mean, std = o["mean"][:B].numpy(), torch.exp(0.5 * o["log_variance"][:B]).numpy()
    den = numpy_denoiser(model)
    first: dict[str, np.ndarray] = {}

    def run(fill: float) -> np.ndarray:
        def grab(k, t, x):
            if k == 0:
                first[fill] = x
                assert t == 999
                raise StopIteration  # only the first step is needed

        with pytest.raises(StopIteration):
            sample(den, z, y, method="ddpm", steps=250, cfg_scale=4.0, callback=grab,
                   noise_fn=lambda k, shape: np.full(shape, fill, np.float32))
        return first[fill]

    m0, m1 = run(0.0), run(1.0)
    assert rel_l2(m0, mean) <= 1e-5
    assert rel_l2(m1 - m0, std) <= 1e-4
    assert std.std() > 0  # the learned variance really varies per element
