"""Small real artifacts for the runtime / sample tests, built once per test session with the project's exporters.

- ``pixel``: the shipped digits model (``ditdeploy/assets/digits.safetensors`` + ``digits.onnx``, trained: its
  samples are real digits, so image parity is meaningful) and its OpenVINO IR (``export_openvino``, into the
  session's temp dir). Without the shipped files, a digits-shaped DiT with random weights is exported instead.
- ``latent``: a tiny latent DiT (4x4x4 latents, 5 classes) plus a tiny random diffusers ``AutoencoderKL`` (8x
  upsampling -> 32x32 RGB): checkpoint, denoiser ONNX whose manifest names ``vae.onnx`` beside it, the decoder
  ONNX (``export_vae_decoder_onnx``), and the VAE folder (``save_pretrained``) for the torch reference decoder.
"""

from __future__ import annotations

from pathlib import Path

from ditdeploy.config.variants import DIGITS, DiTConfig

TINY_LATENT = DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                        num_classes=5, variant="tiny-latent", space="latent")

_CACHE: dict[str, dict[str, Path]] = {}


def _tiny_vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=32)
    return vae.eval()


def shipped() -> dict[str, Path] | None:
    """The shipped digits checkpoint + ONNX, if present."""
    from ditdeploy.sources.shipped import DIGITS_CHECKPOINT as ckpt
    from ditdeploy.sources.shipped import DIGITS_ONNX as onnx

    return {"ckpt": ckpt, "onnx": onnx} if ckpt.exists() and onnx.exists() else None


def pixel_artifacts(root: Path) -> dict[str, Path]:
    """Checkpoint, ONNX and OpenVINO IR of the digits model (shipped, else random weights); cached per session."""
    if "pixel" in _CACHE:
        return _CACHE["pixel"]
    from ditdeploy.export.openvino import export_openvino

    d = root / "pixel"
    d.mkdir(parents=True, exist_ok=True)
    s = shipped()
    if s is not None:
        ckpt, onnx, trained = s["ckpt"], s["onnx"], True
    else:
        from ditdeploy.export.onnx import export_denoiser_onnx
        from ditdeploy.export.randomize import random_model
        from ditdeploy.sources.checkpoints import save_safetensors

        model = random_model("digits", seed=0)
        ckpt = save_safetensors(model, d / "px.safetensors", DIGITS)
        onnx = d / "px.onnx"
        export_denoiser_onnx(model, onnx)
        trained = False
    export_openvino(onnx, d / "px.xml")
    _CACHE["pixel"] = {"dir": d, "ckpt": ckpt, "onnx": onnx, "xml": d / "px.xml", "trained": trained}
    return _CACHE["pixel"]


def latent_artifacts(root: Path) -> dict[str, Path]:
    """Checkpoint + ONNX (decoder named in the manifest) of a tiny latent DiT, and its tiny VAE (ONNX + folder)."""
    if "latent" in _CACHE:
        return _CACHE["latent"]
    from ditdeploy.export.onnx import export_denoiser_onnx
    from ditdeploy.export.openvino import export_openvino
    from ditdeploy.export.randomize import random_model
    from ditdeploy.export.vae import export_vae_decoder_onnx
    from ditdeploy.sources.checkpoints import save_safetensors

    d = root / "latent"
    d.mkdir(parents=True, exist_ok=True)
    vae = _tiny_vae()
    vae.save_pretrained(d / "vae_dir")
    export_vae_decoder_onnx(vae, d / "vae.onnx", latent_sizes=(4,), batch_sizes=(1, 2))
    model = random_model(TINY_LATENT, seed=1)
    ckpt = save_safetensors(model, d / "lt.safetensors", TINY_LATENT)
    export_denoiser_onnx(model, d / "lt.onnx", decoder="vae.onnx")
    export_openvino(d / "lt.onnx", d / "lt.xml")
    _CACHE["latent"] = {"dir": d, "ckpt": ckpt, "onnx": d / "lt.onnx", "xml": d / "lt.xml",
                        "vae_onnx": d / "vae.onnx", "vae_dir": d / "vae_dir"}
    return _CACHE["latent"]
