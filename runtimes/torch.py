"""Torch reference backend: the ``ditdeploy.models.DiT`` from a checkpoint (.safetensors / .pt / .pth).

This is the only runtime module that imports torch, and only when the backend is chosen. It is the reference the
exported backends are compared against (fp32, eval mode, no autocast).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.artifacts import load_manifest
from ditdeploy.errors import DitDeployError, require
from ditdeploy.runtimes.base import DecoderBase, DenoiserBase


def _torch():
    return require("torch", "train", "the torch reference backend")


class TorchDenoiser(DenoiserBase):
    """Wrap a torch DiT (``model(x, t, y)``) as a numpy denoiser."""

    def __init__(self, model: Any, *, manifest: dict[str, Any] | None = None, path: Path | None = None,
                 device: str = "cpu", threads: int | None = None, max_batch: int | None = None):
        torch = _torch()
        if threads:
            torch.set_num_threads(int(threads))
        self.torch = torch
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.path = path
        self.manifest = manifest or {
            "kind": "denoiser",
            "format": "torch",
            "precision": "fp32",
            "config": dataclasses.asdict(self.config),
        }
        self.name = f"torch:{self.device.type}:fp32"
        self.max_batch = max_batch

    @classmethod
    def from_model(cls, model: Any, **kw: Any) -> TorchDenoiser:
        """A denoiser over an in-memory ``ditdeploy.models.DiT``."""
        return cls(model, **kw)

    def _run(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(x).to(self.device), torch.from_numpy(t).to(self.device),
                             torch.from_numpy(y).to(self.device))
        return out.detach().float().cpu().numpy()


class TorchDecoder(DecoderBase):
    """Wrap a torch VAE as a decoder with the artifact contract: raw latents in, images in [-1, 1] out.

    ``module`` is a diffusers ``AutoencoderKL`` (``decode(z / scaling).sample``) or any callable module mapping
    already-scaled latents to images.
    """

    def __init__(self, module: Any, *, scaling: float = 0.18215, latent_channels: int = 4, device: str = "cpu"):
        torch = _torch()
        self.torch = torch
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.scaling = float(scaling)
        self.latent_channels = latent_channels
        self.manifest = {"kind": "decoder", "format": "torch", "precision": "fp32"}
        self.name = f"torch:{self.device.type}:fp32"

    def _run(self, z: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            zt = torch.from_numpy(z).to(self.device) / self.scaling
            out = self.module.decode(zt) if hasattr(self.module, "decode") else self.module(zt)
            out = getattr(out, "sample", out)
        return out.detach().float().cpu().numpy()


def load_denoiser(path: str | os.PathLike, *, image_size: int | None = None, verify: bool = True,
                  device: str = "cpu", threads: int | None = None, max_batch: int | None = None,
                  **_: Any) -> TorchDenoiser:
    """Load a checkpoint with ``ditdeploy.checkpoints.load_model`` (config from safetensors metadata, or
    inferred for official .pt files with ``image_size``); a manifest beside it, if present, is verified."""
    _torch()
    try:
        from ditdeploy.checkpoints import load_model
    except ImportError as e:  # pragma: no cover - checkpoints module ships with ditdeploy
        raise DitDeployError(f"the torch backend needs ditdeploy.checkpoints: {e}") from e
    p = Path(path)
    manifest = load_manifest(p, verify=verify, required=False)
    model = load_model(p, image_size=image_size) if image_size else load_model(p)
    if manifest is not None:
        manifest = {**manifest, "config": dataclasses.asdict(model.config)}
    return TorchDenoiser(model, manifest=manifest, path=p, device=device, threads=threads, max_batch=max_batch)
