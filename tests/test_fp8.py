"""FP8 (E4M3) quantization math on CPU: scales, saturation, the `torch._scaled_mm` linear vs an fp32 fake-quant
reference, which linears are quantized, calibrated activation scales, and the digits model's FP8 accuracy."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ditdeploy.export import fp8  # noqa: E402


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_e4m3_range_and_weight_scales():
    assert fp8.E4M3_MAX == 448.0
    w = torch.randn(6, 32) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 300.0, 0.0])[:, None]
    s = fp8.weight_scales(w)
    assert s.shape == (6,)
    amax = w.abs().amax(dim=1)
    torch.testing.assert_close(s[:5], amax[:5] / 448.0)
    assert s[5] == 1.0  # an all-zero row: scale 1, and it quantizes to zeros
    q = fp8.quantize(w, s[:, None]).float()
    assert q.dtype == torch.float32 and q.abs().amax(dim=1)[:5].eq(448.0).all()  # each row's amax lands on 448
    assert q[5].eq(0).all()


def test_quantize_saturates_and_is_exact_on_the_grid():
    s = torch.tensor(0.5)
    assert fp8.quantize(torch.tensor([1e6, -1e6]), s).float().tolist() == [448.0, -448.0]
    grid = torch.tensor([0.0, 0.015625, 0.25, 1.0, 1.125, 3.5, 240.0, 448.0])  # values E4M3 represents exactly
    back = fp8.quantize(grid * 0.5, s).float() * 0.5
    torch.testing.assert_close(back, grid * 0.5, rtol=0, atol=0)
    # between two grid points (1.0, 1.125): round to nearest, ties to even
    assert fp8.quantize(torch.tensor([1.06, 1.07, 1.0625]), torch.tensor(1.0)).float().tolist() == [1.0, 1.125, 1.0]


def test_scaled_mm_linear_matches_fake_quant_reference():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * torch.logspace(-2, 1, 48)[:, None])
    x = torch.randn(2, 5, 64, generator=g) * 3
    a_scale = x.abs().max() / 448.0
    q = fp8.FP8Linear(lin, float(a_scale))
    got = q(x)
    ref = fp8.fake_quant_linear(x, lin.weight, lin.bias, fp8.weight_scales(lin.weight), q.a_scale)
    assert got.shape == (2, 5, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # same products, only the summation order differs
    exact = lin(x).detach()
    e = rel_l2(got.detach(), exact)
    assert 1e-3 < e < 0.08, e  # really quantized (3-bit mantissa), still close to the fp32 linear
    assert cosine(got.detach(), exact) > 0.998


@pytest.fixture(scope="module")
def digits():
    from ditdeploy.sources.checkpoints import load_model
    from ditdeploy.sources.shipped import DIGITS_CHECKPOINT

    return load_model(DIGITS_CHECKPOINT).eval()


def test_quantized_linears_follow_int8_exclusions(digits):
    names = list(fp8.fp8_linears(digits))
    assert len(names) == 4 * len(digits.blocks)
    assert all(n.split(".")[-1] in ("qkv", "proj", "fc1", "fc2") and n.startswith("blocks.") for n in names)
    assert not [n for n in names if "adaLN" in n or "embedder" in n or "final" in n]
    assert list(fp8.fp8_linears(digits, exclude=["blocks.0.*"]))[0].startswith("blocks.1.")


def test_activation_amax_of_first_qkv_is_its_input_max(digits):
    """Independent computation of blocks.0.attn.qkv's input (patch embed + pos, adaLN modulate of norm1)."""
    from ditdeploy.models import modulate

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1, 8, 8)).astype(np.float32)
    t = np.array([0, 100, 400, 700, 900, 999])
    y = np.array([0, 1, 2, 10, 5, 9])
    amax = fp8.activation_amax(digits, ["blocks.0.attn.qkv"], x, t, y, batch=4)
    with torch.inference_mode():
        xt, tt, yt = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)
        h = digits.x_embedder(xt) + digits.pos_embed
        c = digits.t_embedder(tt) + digits.y_embedder(yt, False)
        blk = digits.blocks[0]
        sh1, sc1 = blk.adaLN_modulation(c).chunk(6, dim=1)[:2]
        inp = modulate(blk.norm1(h), sh1, sc1)
    assert amax["blocks.0.attn.qkv"] == pytest.approx(float(inp.abs().max()), rel=1e-6)


def test_calibrated_fp8_digits_within_goal(digits):
    """FP8 digits model (scales from sampling-trajectory inputs) vs fp32 on the export probes: cosine >= 0.995."""
    from ditdeploy.calibration.capture import capture_inputs
    from ditdeploy.proof.parity import probe_inputs as denoiser_inputs
    from ditdeploy.runtimes.torch import TorchDenoiser

    cal = capture_inputs(TorchDenoiser(digits), digits.config, samples=10, seed=1, steps=10, timesteps=5)

    class Cal:  # the CalibrationSet fields calibrated_fp8 reads
        x, t, y, sha256 = cal["x"], cal["t"], cal["y"], "test"

        def __len__(self):
            return len(self.x)

    q, info = fp8.calibrated_fp8(digits, Cal())
    assert info["quantized_linears"] == 16 and info["calibration_samples"] == len(cal["x"])
    assert sum(isinstance(m, fp8.FP8Linear) for m in q.modules()) == 16
    assert not any(isinstance(m, fp8.FP8Linear) for m in digits.modules())  # the fp32 model is untouched
    for feed in denoiser_inputs(digits.config, (1, 3), seed=0):
        args = [torch.from_numpy(feed[k]) for k in ("x", "t", "y")]
        with torch.inference_mode():
            ref, got = digits(*args).numpy(), q(*args).numpy()
        assert cosine(got, ref) >= 0.995
        assert rel_l2(got, ref) > 1e-3  # the FP8 path really ran


def test_fp8_package_module_exports_with_scaled_mm(digits):
    """The module `export --fmt aoti --precision fp8` compiles: FP8 linears keep E4M3 weights and fp32 scales inside
    the bf16 model, torch.export captures one `_scaled_mm` per quantized linear with a dynamic batch, and the
    exported program computes what the eager module does (cosine vs fp32 at the fp8 bar)."""
    from ditdeploy.export.aoti import precision_module
    from ditdeploy.proof.parity import probe_inputs as denoiser_inputs

    f8 = denoiser_inputs(digits.config, (8,), seed=3)[0]

    class Cal:
        x, t, y, sha256 = f8["x"], f8["t"], f8["y"], None

        def __len__(self):
            return 8

    m, info = precision_module(digits, "fp8", Cal())
    buffers = dict(m.named_buffers())
    assert buffers["net.blocks.0.attn.qkv.weight_fp8"].dtype == torch.float8_e4m3fn
    assert buffers["net.blocks.0.attn.qkv.w_scale"].dtype == torch.float32
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    b = torch.export.Dim("batch", min=1)
    args = (torch.randn(2, 1, 8, 8), torch.tensor([1, 999]), torch.tensor([0, 10]))
    ep = torch.export.export(m, args, dynamic_shapes={"x": {0: b}, "t": {0: b}, "y": {0: b}}, strict=False)
    assert sum("scaled_mm" in str(n.target) for n in ep.graph.nodes) == info["quantized_linears"] == 16
    feed = denoiser_inputs(digits.config, (1, 3), seed=0)[1]
    a = [torch.from_numpy(feed[k]) for k in ("x", "t", "y")]
    with torch.no_grad():
        eager, exported, ref = m(*a), ep.module()(*a), digits(*a)
    assert torch.equal(eager, exported)
    assert cosine(eager.numpy(), ref.numpy()) >= 0.995


def test_every_fp8_buffer_on_the_model_device():
    """Issue #21 defect 4: an FP8 model built from a model on device D has every buffer (E4M3 weights, weight and
    activation scales, bias) on D. The meta device stands in for CUDA here: a buffer created without a device lands
    on the CPU, which CUDA ``_scaled_mm`` and torch.export's device propagation refuse."""
    from ditdeploy.config.variants import DIGITS
    from ditdeploy.models import create_model

    with torch.device("meta"):
        model = create_model(DIGITS)
    names = list(fp8.fp8_linears(model))
    q = fp8.fp8_model(model, {n: 3.0 for n in names})
    fp8_mods = [m for m in q.modules() if isinstance(m, fp8.FP8Linear)]
    assert len(fp8_mods) == len(names) == 4 * DIGITS.depth
    devices = {name: b.device.type for name, b in q.named_buffers()}
    assert devices and set(devices.values()) == {"meta"}, {k: v for k, v in devices.items() if v != "meta"}
    assert {b.device.type for b in q.parameters()} == {"meta"}
    a = fp8_mods[0].a_scale
    assert a.dtype == torch.float32 and a.shape == ()
