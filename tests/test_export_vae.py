"""VAE decoder export: a tiny random diffusers AutoencoderKL built in-process (no downloads)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ditdeploy.artifact.manifest import load_manifest
from ditdeploy.errors import ArtifactError
from ditdeploy.export.vae import export_vae_decoder_onnx
from ditdeploy.proof.distances import rel_l2


def make_tiny_vae(path, seed: int = 0):
    """An 8x-upsampling AutoencoderKL (4 blocks like SD's VAE) with 8/16 channels, saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64,
    ).eval()
    with torch.no_grad():  # spread the output so the [-1, 1] clamp is not all that is compared
        vae.decoder.conv_out.weight.mul_(3.0)
    vae.save_pretrained(str(path))
    return vae


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae = make_tiny_vae(d)
    return d, vae


def test_vae_decoder_from_dir(tmp_path, tiny_vae):
    vae_dir, vae = tiny_vae
    out = tmp_path / "vae_decoder.onnx"
    man = export_vae_decoder_onnx(vae_dir, out, latent_sizes=(4, 6), batch_sizes=(1, 2))
    assert man["kind"] == "decoder" and man["latent_channels"] == 4 and man["upsample"] == 8
    assert man["scaling_factor"] == pytest.approx(0.18215)
    assert [b["latent_shape"] for b in man["parity"]["batches"]] == [[1, 4, 4, 4], [2, 4, 6, 6]]
    assert man["parity"]["worst"]["rel_l2"] <= 1e-4
    assert set(man["source"]["weights"]) == {"diffusion_pytorch_model.safetensors"}
    load_manifest(out)
    m = onnx.load(str(out))
    assert [i.name for i in m.graph.input] == ["latents"] and [o.name for o in m.graph.output] == ["image"]
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 4, "height", "width"]
    # independent check at a size and batch the export did not use: raw latents in, /0.18215 inside
    rng = np.random.default_rng(7)
    z = rng.standard_normal((3, 4, 5, 7)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["image"], {"latents": z})[0]
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(z) / 0.18215).sample.clamp(-1, 1).numpy()
    assert got.shape == (3, 3, 40, 56)
    assert got.min() >= -1.0 and got.max() <= 1.0
    assert 0.05 < np.mean(np.abs(ref)) and np.mean(np.abs(ref) < 0.999) > 0.5  # mostly not clamped
    assert rel_l2(got, ref) <= 1e-4
    # without the /0.18215 inside, the result would be far off
    with torch.no_grad():
        unscaled = vae.decode(torch.from_numpy(z)).sample.clamp(-1, 1).numpy()
    assert rel_l2(unscaled, ref) > 0.05


def test_vae_bad_dir(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        export_vae_decoder_onnx(tmp_path / "nope", tmp_path / "v.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="config.json"):
        export_vae_decoder_onnx(tmp_path / "empty", tmp_path / "v.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
