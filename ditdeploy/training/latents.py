"""SD-VAE latents for training: a local diffusers ``AutoencoderKL`` encoding images, and a latent cache.

The ``AutoencoderKL`` is loaded from a local folder and encodes images to the latent distribution; the cache
is precomputed with ``--precompute-latents``.

A latent is ``encode(x).latent_dist.sample() * 0.18215``, i.e. ``(mean + exp(logvar / 2) * eps) * 0.18215``.
The cache stores the distribution's *moments* (mean, logvar) of every image, for both horizontal orientations
when flipping is on, so training from the cache still draws a fresh latent sample and a random flip each time,
exactly as encoding on the fly would (eps comes from the same per-step generator either way).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ditdeploy.errors import DitDeployError

LATENT_SCALE = 0.18215
CACHE_VERSION = 1


def load_vae(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """``AutoencoderKL.from_pretrained(path)`` (local folder only, no download), eval mode, no grads."""
    from ditdeploy.errors import require

    p = Path(path)
    if not (p / "config.json").is_file():
        raise DitDeployError(f"--vae {p} is not a diffusers AutoencoderKL folder (no config.json): pass a local "
                             "folder saved with save_pretrained, e.g. a download of stabilityai/sd-vae-ft-ema")
    require("diffusers", "vae", "loading the VAE")
    from ditdeploy.sources.diffusers_snapshot import load_autoencoder

    vae = load_autoencoder(p)
    vae.requires_grad_(False)
    return vae.eval().to(device)


def vae_downsample(vae) -> int:
    """Spatial downsampling factor of an AutoencoderKL (8 for the SD VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of a VAE folder: sha256 of its config plus names and sizes of its weight files."""
    p = Path(path)
    h = hashlib.sha256((p / "config.json").read_bytes())
    for f in sorted(p.iterdir()):
        if f.suffix in (".safetensors", ".bin"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) of ``vae.encode(images).latent_dist`` in float32 (logvar clamped as diffusers does)."""
    dist = vae.encode(images).latent_dist
    return dist.mean.float(), dist.logvar.float()


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor, scale: float = LATENT_SCALE) -> torch.Tensor:
    """``(mean + exp(logvar / 2) * eps) * scale``: ``latent_dist.sample()`` with given noise, scaled."""
    return (mean + torch.exp(0.5 * logvar) * eps) * scale


class LatentCache:
    """Memory-mapped moments: ``moments.npy`` float32 (N, F, 2, C, h, w) (F = 2 orientations when flipping, else 1;
    axis 2 = mean, logvar), ``labels.npy`` int64 (N,), ``meta.json`` describing what it was built from."""

    FILES = ("moments.npy", "labels.npy", "meta.json")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
            self.moments = np.load(self.path / "moments.npy", mmap_mode="r")
            self.labels = np.load(self.path / "labels.npy")
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise DitDeployError(f"latent cache {self.path} is unreadable ({e}): delete it to rebuild") from e
        if self.moments.ndim != 6 or self.moments.shape[0] != len(self.labels):
            raise DitDeployError(f"latent cache {self.path} is inconsistent: delete it to rebuild")

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return all((Path(path) / f).exists() for f in LatentCache.FILES)

    def check_matches(self, expected: dict) -> None:
        """Refuse a cache built from other data / VAE / size / flip setting."""
        for k, v in expected.items():
            if self.meta.get(k) != v:
                raise DitDeployError(
                    f"latent cache {self.path} was built with a different {k} ({self.meta.get(k)!r} != {v!r}): "
                    "delete it or pass another --latent-cache"
                )


def build_latent_cache(index, vae, path: str | os.PathLike, image_size: int, flip: bool, meta: dict,
                       batch_size: int = 32, device: torch.device | str = "cpu", progress: bool = True) -> LatentCache:
    """Encode every image of ``index`` (an ImageFolderIndex) once and write the cache atomically (temp dir, then
    moved into place with meta.json last), so an interrupted extraction never leaves a usable-looking cache."""
    from tqdm import tqdm

    from ditdeploy.artifact.files import atomic_dir
    from ditdeploy.training.data import load_image

    path = Path(path)
    n = len(index)
    orientations = (False, True) if flip else (False,)
    down = vae_downsample(vae)
    c, h = vae.config.latent_channels, image_size // down
    finals = [path / f for f in LatentCache.FILES]
    with atomic_dir(finals) as tmp:
        mm = np.lib.format.open_memmap(tmp / "moments.npy", mode="w+", dtype=np.float32,
                                       shape=(n, len(orientations), 2, c, h, h))
        bar = tqdm(total=n, desc="extract latents", unit="img", disable=not progress, dynamic_ncols=True)
        for start in range(0, n, batch_size):
            ids = range(start, min(n, start + batch_size))
            for j, fl in enumerate(orientations):
                imgs = np.stack([load_image(index.paths[i], image_size, fl) for i in ids])
                mean, logvar = encode_moments(vae, torch.from_numpy(imgs).to(device))
                mm[start : start + len(ids), j, 0] = mean.cpu().numpy()
                mm[start : start + len(ids), j, 1] = logvar.cpu().numpy()
            bar.update(len(ids))
        bar.close()
        mm.flush()
        del mm
        np.save(tmp / "labels.npy", index.labels)
        (tmp / "meta.json").write_text(json.dumps({**meta, "version": CACHE_VERSION, "num_items": n,
                                                    "orientations": len(orientations)}, indent=2, sort_keys=True))
    return LatentCache(path)
