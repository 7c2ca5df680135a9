"""Reference DiT vs an independent re-implementation of the official forward, plus shapes, counts and numerics.

Tolerances: fp32 model vs a float64 reference, rel-L2 <= 1e-5 (fp32 rounding through a few blocks is ~1e-7..1e-6;
a wrong layout, constant or channel order shows up as >= 1e-2).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from official_model_ref import (
    make_official_state_dict,
    official_param_shapes,
    ref_forward,
    ref_forward_with_cfg,
    sincos_pos_embed_2d,
    timestep_sinusoid_np,
)

from ditdeploy.config.variants import CONDITIONINGS, VARIANTS, DiTConfig, variant_config
from ditdeploy.models import DiT, DiT_models, create_model, get_2d_sincos_pos_embed, timestep_embedding

TOL_FP32 = 1e-5


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _inputs(n: int, c: int, size: int, num_classes: int, seed: int = 0, null_tail: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g)
    t = torch.linspace(0, 999, n).round().long()  # spans the schedule, includes 0 and 999
    y = torch.randint(0, num_classes, (n,), generator=g)
    if null_tail:
        y[-null_tail:] = num_classes
    return x, t, y


# (arch kwargs, heads): S/2-shaped (hidden 384, 6 heads, patch 2) at depth 2; a patch-4 model; no learned sigma and
# no null row; a 1-channel pixel-space model like the shipped digits preset.
OFFICIAL_CASES = {
    "S2-depth2": (dict(input_size=16, patch_size=2, in_channels=4, hidden_size=384, depth=2, num_classes=1000), 6),
    "patch4": (dict(input_size=16, patch_size=4, in_channels=4, hidden_size=128, depth=3, num_classes=7), 4),
    "no-sigma-no-null": (
        dict(input_size=8, patch_size=2, in_channels=4, hidden_size=96, depth=2, num_classes=5,
             learn_sigma=False, class_dropout_prob=0.0), 3),
    "one-channel": (dict(input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=2, num_classes=10), 4),
}


@pytest.mark.parametrize("case", list(OFFICIAL_CASES))
def test_official_format_state_dict_loads_strictly_and_matches_reference(case):
    arch, heads = OFFICIAL_CASES[case]
    sd = make_official_state_dict(seed=1, **arch)  # built by name/shape from the official layout, not by DiT
    model = DiT(num_heads=heads, **arch)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    c, n_cls = arch["in_channels"], arch["num_classes"]
    with_null = arch.get("class_dropout_prob", 0.1) > 0
    x, t, y = _inputs(6, c, arch["input_size"], n_cls, null_tail=1 if with_null else 0)
    with torch.no_grad():
        out = model(x, t, y)
    ref = ref_forward(sd, x, t, y, num_heads=heads)
    out_c = 2 * c if arch.get("learn_sigma", True) else c
    assert out.shape == (6, out_c, arch["input_size"], arch["input_size"])
    assert ref.abs().mean() > 0.1  # a real signal, not zeros
    assert rel_l2(out, ref) <= TOL_FP32

    if not with_null:
        return
    y_cfg = torch.cat([y[:3], torch.full((3,), n_cls)])  # [cond; uncond]
    with torch.no_grad():
        got = model.forward_with_cfg(x, t, y_cfg, 4.0)
        got_all = model.forward_with_cfg(x, t, y_cfg, 4.0, guide_all_channels=True)
    want = ref_forward_with_cfg(sd, x, t, y_cfg, 4.0, num_heads=heads, guided_channels=min(3, c))
    want_all = ref_forward_with_cfg(sd, x, t, y_cfg, 4.0, num_heads=heads, guided_channels=c)
    assert rel_l2(got, want) <= TOL_FP32
    assert rel_l2(got_all, want_all) <= TOL_FP32
    if c > 3:  # the official quirk is observable: channel 3 unguided by default, guided with the option
        assert rel_l2(got[:, 3], got_all[:, 3]) > 1e-2


def _perturb_all(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Add noise to every trainable parameter, so the zero-initialised adaLN/final layers are non-zero too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "arch,heads",
    [
        (dict(input_size=16, patch_size=2, in_channels=4, hidden_size=384, depth=2, num_classes=1000), 6),
        (dict(input_size=16, patch_size=4, in_channels=4, hidden_size=128, depth=2, num_classes=10), 4),
    ],
    ids=["S2-depth2", "patch4"],
)
def test_dit_with_nonzero_weights_matches_reference(arch, heads):
    torch.manual_seed(0)
    model = DiT(num_heads=heads, **arch).eval()
    _perturb_all(model)
    for name, p in model.named_parameters():
        assert p.abs().sum() > 0, name  # no layer left at zero
    sd = model.state_dict()
    x, t, y = _inputs(4, 4, arch["input_size"], arch["num_classes"], seed=3, null_tail=2)
    with torch.no_grad():
        out = model(x, t, y)
        cfg = model.forward_with_cfg(x, t, y, 4.0)
        cfg_all = model.forward_with_cfg(x, t, y, 4.0, guide_all_channels=True)
    assert rel_l2(out, ref_forward(sd, x, t, y, num_heads=heads)) <= TOL_FP32
    assert rel_l2(cfg, ref_forward_with_cfg(sd, x, t, y, 4.0, num_heads=heads)) <= TOL_FP32
    assert rel_l2(cfg_all, ref_forward_with_cfg(sd, x, t, y, 4.0, num_heads=heads, guided_channels=4)) <= TOL_FP32


# ------------------------------------------------------------------------------------------ variants (meta device)


@pytest.mark.parametrize("image_size", [256, 512])
def test_all_variants_names_counts_and_forward_shapes(image_size):
    """Meta device (no memory, no math): official names/shapes, parameter counts, forward output shapes."""
    s = image_size // 8
    for name, v in VARIANTS.items():
        cfg = variant_config(name, image_size)
        with torch.device("meta"), torch.no_grad():
            model = create_model(name, image_size).eval()
            out = model(torch.empty(3, 4, s, s), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
        assert out.shape == (3, 8, s, s), name
        shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
        official = official_param_shapes(
            input_size=s, patch_size=v["patch_size"], in_channels=4, hidden_size=v["hidden_size"], depth=v["depth"]
        )
        assert shapes == official, name  # exactly the official names and shapes: strict loads work
        n = sum(p.numel() for p in model.parameters())
        assert n == cfg.param_count() == sum(math.prod(x) for x in official.values()), name
        if name == "XL/2" and image_size == 256:
            assert n == 675_129_632


def test_official_factories_and_cfg_shape_meta():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=64).eval()
        out = model.forward_with_cfg(torch.empty(4, 4, 64, 64), torch.zeros(4, dtype=torch.long),
                                     torch.zeros(4, dtype=torch.long), 4.0)
    assert out.shape == (4, 8, 64, 64)
    assert sum(p.numel() for p in model.parameters()) == variant_config("XL/2", 512).param_count() == 676_014_368


@pytest.mark.parametrize("name,image_size", [("S/8", 256), ("S/4", 256), ("S/8", 512)])
def test_real_forward_small_variants(name, image_size):
    torch.manual_seed(0)
    model = create_model(name, image_size).eval()
    _perturb_all(model, scale=0.02)
    s = image_size // 8
    x, t, y = _inputs(2, 4, s, 1000)
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (2, 8, s, s)
    assert torch.isfinite(out).all() and out.abs().mean() > 0


def test_official_init_outputs_zero():
    """adaLN-Zero + zeroed final layer: a freshly initialised official model predicts exactly zero."""
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10).eval()
    x, t, y = _inputs(2, 4, 8, 10)
    with torch.no_grad():
        assert torch.count_nonzero(model(x, t, y)) == 0


# ------------------------------------------------------------------------------------------------- embeddings


def test_timestep_embedding_matches_numpy():
    t = np.array([0, 1, 7, 250, 500, 999])
    got = timestep_embedding(torch.from_numpy(t)).double().numpy()
    want = timestep_sinusoid_np(t)  # float64, divisor 128, [cos, sin]
    assert got.shape == (6, 256)
    # fp32 arguments t*f reach ~1000 rad, whose float32 spacing is 6.1e-5: the sinusoid can be off by that much.
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(got - timestep_sinusoid_np(t, divisor=127)).max() > 0.5  # diffusers' divisor is detectably wrong
    assert np.abs(got[:, :128] - np.sin(t[:, None] * np.exp(-np.log(1e4) * np.arange(128) / 128))).max() > 0.5


def test_pos_embed_matches_numpy_loops():
    for dim, grid in [(384, 16), (1152, 4), (128, 4)]:
        want = sincos_pos_embed_2d(dim, grid)
        assert np.abs(get_2d_sincos_pos_embed(dim, grid) - want).max() < 1e-12
        swapped = np.concatenate([want[:, dim // 2:], want[:, :dim // 2]], axis=1)
        assert np.abs(get_2d_sincos_pos_embed(dim, grid) - swapped).max() > 0.5  # row/column order matters
    model = DiT(input_size=32, patch_size=2, hidden_size=384, depth=1, num_heads=6)
    assert not model.pos_embed.requires_grad
    table = model.pos_embed.detach().double().numpy()[0]
    assert np.abs(table - sincos_pos_embed_2d(384, 16)).max() < 1e-6  # stored as float32


# --------------------------------------------------------------------------------------- conditioning designs


def _small(conditioning: str) -> DiT:
    return create_model(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                                  num_classes=10, conditioning=conditioning, variant="custom"))


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_conditioning_forward_shape_and_count(conditioning):
    model = _small(conditioning).eval()
    assert sum(p.numel() for p in model.parameters()) == model.config.param_count()
    x, t, y = _inputs(3, 4, 8, 10)
    with torch.no_grad():
        assert model(x, t, y).shape == (3, 8, 8, 8)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_conditioning_is_trainable(conditioning):
    """From the official init, after two Adam steps every trainable parameter receives a non-zero gradient
    (zero-initialised gates/outputs open up), pos_embed none, and 40 steps fit a fixed batch far better."""
    torch.manual_seed(0)
    model = _small(conditioning).train()
    x, t, y = _inputs(8, 4, 8, 10, seed=5)
    target = torch.randn(8, 8, 8, 8, generator=torch.Generator().manual_seed(6))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_fn():
        model.y_embedder.dropout_prob = 0.0  # deterministic labels for the fit
        return ((model(x, t, y) - target) ** 2).mean()

    losses = []
    for step in range(40):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if step == 2:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None and p.grad.abs().sum() > 0, f"{conditioning}: no gradient for {name}"
            assert model.pos_embed.grad is None
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < 0.7 * losses[0], losses[::10]


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_forward_with_cfg_semantics(conditioning):
    """Channels 0..2 = uncond + s (cond - uncond) in both halves; the rest are the model's own outputs per half."""
    torch.manual_seed(1)
    model = _small(conditioning).eval()
    _perturb_all(model, seed=2, scale=0.1)
    x, t, _ = _inputs(2, 4, 8, 10, seed=7)
    x = torch.cat([x, torch.randn_like(x)])  # the second half's x must be ignored
    t = torch.cat([t, t])
    y = torch.tensor([3, 8, 10, 10])
    s = 4.0
    with torch.no_grad():
        got = model.forward_with_cfg(x, t, y, s)
        got_all = model.forward_with_cfg(x, t, y, s, guide_all_channels=True)
        cond = model(x[:2], t[:2], y[:2])
        uncond = model(x[:2], t[2:], y[2:])
    guided = uncond + s * (cond - uncond)
    for half, own in ((got[:2], cond), (got[2:], uncond)):
        assert rel_l2(half[:, :3], guided[:, :3]) < 1e-5
        assert rel_l2(half[:, 3:], own[:, 3:]) < 1e-5
    assert torch.equal(got[:2, :3], got[2:, :3])
    assert rel_l2(got_all[:2, :4], guided[:, :4]) < 1e-5 and torch.equal(got_all[:2, :4], got_all[2:, :4])
    assert rel_l2(got_all[2:, 4:], uncond[:, 4:]) < 1e-5
    assert rel_l2(cond[:, :3], uncond[:, :3]) > 1e-3  # the label matters, so the checks above are not vacuous
