"""INT8 VAE decoder: calibrated on latents of a real sampling run, per-channel Conv weights, PSNR vs fp32 recorded;
the weight form by target (7-bit for x86 CPUs without VNNI, full range otherwise); failures name the CPU's ISA."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_export import tiny_model
from test_export_vae import make_tiny_vae

from ditdeploy.diffusion import sample
from ditdeploy.errors import NumericsError
from ditdeploy.export.vae import export_vae_decoder_onnx
from ditdeploy.runtimes import load_decoder
from ditdeploy.runtimes.torch import TorchDenoiser
from ditdeploy.system.cpu_isa import detect
from experiments.vae_int8 import quantize_decoder_int8


def _latents(seed: int, n: int) -> np.ndarray:
    """x_0 latents from a real (tiny, random-weight) DiT sampling run, scaled like SD latents."""
    den = TorchDenoiser.from_model(tiny_model(seed=3))
    noise = np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)
    return sample(den, noise, np.arange(n) % 10, steps=5, cfg_scale=4.0, num_classes=10)


@pytest.fixture(scope="module")
def fp32_decoder(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae8")
    make_tiny_vae(d / "vae")
    out = d / "vae_decoder.onnx"
    export_vae_decoder_onnx(str(d / "vae"), out, latent_sizes=(8,), batch_sizes=(1,))
    return out


@pytest.mark.parametrize("target", ["cpu-avx2", "cpu-vnni"])
def test_int8_decoder_quantized_and_close_to_fp32(fp32_decoder, tmp_path, target):
    calib, val = _latents(0, 8), _latents(1, 4)
    out = tmp_path / "vae_decoder-int8.onnx"
    man = quantize_decoder_int8(fp32_decoder, out, calib, val, source="tiny DiT ddim 5 cfg 4", target=target)
    where = f"INT8 decoder form {target} on CPU {detect().label()}"
    assert man["precision"] == "int8" and man["kind"] == "decoder"
    assert man["int8"]["target"] == target and man["int8"]["weight_bits"] == (7 if target == "cpu-avx2" else 8)
    g = onnx.load(str(out))
    # the form in the file: 7-bit weights (|w| <= 64: no int16 saturation on AVX2 u8s8 kernels) or full range
    qmax = max(int(np.abs(onnx.numpy_helper.to_array(i).astype(np.int32)).max()) for i in g.graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4)
    assert qmax == man["int8"]["weight_range"][1] == (64 if target == "cpu-avx2" else 127), where
    ops = [n.op_type for n in g.graph.node]
    convs = ops.count("Conv")
    assert convs > 5 and ops.count("DequantizeLinear") >= 2 * convs  # every Conv's input and weight dequantized
    wdq = [n for n in g.graph.node if n.op_type == "DequantizeLinear" and "weight" in n.input[0]]
    scales = {i.name: i for i in g.graph.initializer}
    assert any(len(scales[n.input[1]].dims) == 1 and scales[n.input[1]].dims[0] > 1 for n in wdq)  # per channel
    # recorded accuracy and an independent check through the runtime
    assert man["parity"]["psnr_db"] >= 30.0, where
    dec8, dec32 = load_decoder(out), load_decoder(fp32_decoder)
    a = (np.clip(dec8(val), -1, 1) + 1) * 127.5
    b = (np.clip(dec32(val), -1, 1) + 1) * 127.5
    psnr = 10 * np.log10(255.0**2 / np.mean((a - b) ** 2))
    assert psnr == pytest.approx(man["parity"]["psnr_db"], abs=0.5) and 30.0 <= psnr < 80.0, where  # changed, but close


def test_int8_decoder_below_the_bar_writes_nothing(fp32_decoder, tmp_path):
    out = tmp_path / "bad.onnx"
    with pytest.raises(NumericsError, match="nothing was written"):
        quantize_decoder_int8(fp32_decoder, out, _latents(0, 2), _latents(1, 2), min_psnr_db=200.0)
    assert list(tmp_path.iterdir()) == []
