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

from ditdeploy.artifact.manifest import Manifest
from ditdeploy.errors import DitDeployError, require
from ditdeploy.runtimes.base import DecoderBase, DenoiserBase
from ditdeploy.runtimes.registry import BackendSpec

BACKEND = BackendSpec("torch", reads=(".safetensors", ".pt", ".pth"), claims=(".safetensors", ".pt", ".pth"),
                      aliases=("pytorch",), distributions=("torch",), imports="torch")


def _torch():
    try:
        import torch
    except ImportError as e:
        from ditdeploy.runtimes.base import missing

        raise missing("torch", "the torch reference backend needs PyTorch (pip install torch; the CPU build is "
                               "enough): exported .onnx/.xml artifacts run without it") from e
    return torch


class TorchDenoiser(DenoiserBase):
    """Wrap a torch DiT (``model(x, t, y)``) as a numpy denoiser."""

    def __init__(self, model: Any, *, manifest: dict[str, Any] | None = None, path: Path | None = None,
                 device: str = "cpu", threads: int | None = None, max_batch: int | None = None,
                 cuda_graph: bool = False):
        torch = _torch()
        if threads:
            torch.set_num_threads(int(threads))
        self.torch = torch
        self.device = torch.device(device)
        if cuda_graph:
            from ditdeploy.runtimes.cuda_staging import require_cuda_for_graph

            require_cuda_for_graph(self.device, "the torch backend (pass device='cuda')")
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.path = path
        self.manifest = Manifest.of(manifest or {"kind": "denoiser", "format": "torch", "precision": "fp32",
                                                 "config": dataclasses.asdict(self.config)}, path)
        self.name = f"torch:{self.device.type}{':cuda-graph' if cuda_graph else ''}:fp32"
        self.max_batch = max_batch
        self.staged = None
        if self.device.type == "cuda":  # inputs staged once per call; optional CUDA graph per batch size
            from ditdeploy.runtimes.cuda_staging import StagedCall

            self.staged = StagedCall(self.model, self.device, graph=cuda_graph)

    @classmethod
    def from_model(cls, model: Any, **kw: Any) -> TorchDenoiser:
        """A denoiser over an in-memory ``ditdeploy.models.DiT``."""
        return cls(model, **kw)

    def _run(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        torch = self.torch
        if self.staged is not None:
            return self.staged(x, t, y)
        with torch.inference_mode():
            out = self.model(*self._tensors(x, t, y))
        return out.detach().float().cpu().numpy()

    def _tensors(self, *arrays: np.ndarray) -> list[Any]:
        return [self.torch.from_numpy(a).to(self.device) for a in arrays]

    @property
    def supports_cache(self) -> bool:  # type: ignore[override]
        return getattr(self.model, "conditioning", None) == "adaln-zero"

    def _run_full(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from ditdeploy.feature_cache import forward_with_cache

        with self.torch.inference_mode():
            out, cache = forward_with_cache(self.model, *self._tensors(x, t, y))
        return out.float().cpu().numpy(), cache.float().cpu().numpy()

    def _run_light(self, x: np.ndarray, t: np.ndarray, y: np.ndarray, cache: np.ndarray) -> np.ndarray:
        from ditdeploy.feature_cache import forward_from_cache

        with self.torch.inference_mode():
            out = forward_from_cache(self.model, *self._tensors(x, t, y, cache))
        return out.float().cpu().numpy()


class TorchDecoder(DecoderBase):
    """Wrap a torch VAE as a decoder with the artifact contract: raw latents in, images clamped to [-1, 1] out.

    ``module`` is a diffusers ``AutoencoderKL`` (``decode(z / scaling_factor).sample``; the scaling factor from its
    config unless given) or any callable module mapping already-scaled latents to images.
    """

    def __init__(self, module: Any, *, scaling: float | None = None, latent_channels: int | None = None,
                 device: str = "cpu", threads: int | None = None, path: Path | None = None):
        torch = _torch()
        if threads:
            torch.set_num_threads(int(threads))
        self.torch = torch
        self.device = torch.device(device)
        self.module = module.to(self.device).float().eval()
        cfg = getattr(module, "config", None)
        self.scaling = float(scaling if scaling is not None else getattr(cfg, "scaling_factor", 0.18215))
        self.latent_channels = int(latent_channels or getattr(cfg, "latent_channels", 4))
        self.path = path
        self.manifest = Manifest({"kind": "decoder", "format": "torch", "precision": "fp32",
                                  "latent_channels": self.latent_channels, "scaling_factor": self.scaling}, path)
        self.name = f"torch:{self.device.type}:fp32"

    def _run(self, z: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            zt = torch.from_numpy(z).to(self.device) / self.scaling
            out = self.module.decode(zt) if hasattr(self.module, "decode") else self.module(zt)
            out = getattr(out, "sample", out)
        return out.detach().float().clamp(-1.0, 1.0).cpu().numpy()


def load_decoder(path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None) -> TorchDecoder:
    """A diffusers ``AutoencoderKL`` folder (local files only) as the reference decoder."""
    _torch()
    require("diffusers", "vae", "the torch VAE decoder")
    from ditdeploy.sources.diffusers_snapshot import load_autoencoder

    p = Path(path)
    vae = load_autoencoder(p, low_cpu_mem_usage=False)
    return TorchDecoder(vae, device=device, threads=threads, path=p)


def load_denoiser(path: str | os.PathLike, *, image_size: int | None = None, verify: bool = True,
                  device: str = "cpu", threads: int | None = None, max_batch: int | None = None,
                  cuda_graph: bool = False) -> TorchDenoiser:
    """Load a checkpoint with ``ditdeploy.sources.checkpoints.load_model`` (config from safetensors metadata, or
    inferred for official .pt files with ``image_size``); a manifest beside it, if present, is verified."""
    _torch()
    if cuda_graph:  # before the (possibly large) checkpoint is read
        from ditdeploy.runtimes.cuda_staging import require_cuda_for_graph

        require_cuda_for_graph(device, "the torch backend (pass device='cuda')")
    try:
        from ditdeploy.sources.checkpoints import load_model
    except ImportError as e:  # pragma: no cover - checkpoints module ships with ditdeploy
        raise DitDeployError(f"the torch backend needs ditdeploy.sources.checkpoints: {e}") from e
    p = Path(path)
    manifest = Manifest.load(p, verify=verify, required=False) if p.is_file() else None
    model = load_model(p, image_size=image_size) if image_size else load_model(p)
    if p.is_dir():  # a diffusers snapshot: its class names and vae/ folder (decoded by the torch reference)
        from ditdeploy.sources.diffusers_snapshot import locate

        snap = locate(p)
        manifest = {"kind": "denoiser", "format": "diffusers", "precision": "fp32",
                    "id2label": {str(k): v for k, v in (snap.id2label or {}).items()} or None,
                    "decoder": str(snap.vae.relative_to(p.parent)) if snap.vae else None}
    if manifest is not None:
        manifest = Manifest({**manifest, "config": dataclasses.asdict(model.config)}, p)
    return TorchDenoiser(model, manifest=manifest, path=p, device=device, threads=threads, max_batch=max_batch,
                         cuda_graph=cuda_graph)
