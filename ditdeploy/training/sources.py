"""Where a training batch's x0 comes from: pixel arrays, VAE-encoded images, or a latent cache.

Pixel arrays are the digits; images are encoded by a VAE on the fly. ``load`` runs in data-loader workers
(numpy only); ``to_x0`` runs in the training process on the device.
"""

from __future__ import annotations

import numpy as np
import torch

from ditdeploy.training.latents import LATENT_SCALE, LatentCache, encode_moments, sample_latents


class PixelSource:
    """In-memory images already in [-1, 1] (the digits preset); no flipping, no latent noise."""

    needs_eps = False

    def __init__(self, x: np.ndarray, labels: np.ndarray):
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sample_shape = tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, idx: np.ndarray, flips: np.ndarray) -> np.ndarray:
        return self.x[idx]

    def to_x0(self, payload: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        return payload


class ImageVAESource:
    """ImageFolder images (center crop, flip) encoded by the VAE at every step (the official train.py path)."""

    needs_eps = True

    def __init__(self, index, image_size: int, vae, flip: bool = True, scale: float = LATENT_SCALE):
        self.index = index
        self.labels = index.labels
        self.image_size = image_size
        self.flip = flip
        self.vae = vae
        self.scale = scale
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        self.sample_shape = (vae.config.latent_channels, image_size // down, image_size // down)

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):  # data-loader workers need only the file list, not the VAE
        d = dict(self.__dict__)
        d["vae"] = None
        return d

    def load(self, idx: np.ndarray, flips: np.ndarray) -> np.ndarray:
        from ditdeploy.training.data import load_image

        return np.stack([load_image(self.index.paths[i], self.image_size, bool(f) and self.flip)
                         for i, f in zip(idx, flips, strict=True)])

    def to_x0(self, payload: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        mean, logvar = encode_moments(self.vae, payload)
        return sample_latents(mean, logvar, eps, self.scale)


class LatentCacheSource:
    """Moments from a :class:`LatentCache`; a latent is sampled from them each step."""

    needs_eps = True

    def __init__(self, cache: LatentCache, scale: float = LATENT_SCALE):
        self.cache = cache
        self.labels = cache.labels
        self.scale = scale
        self.sample_shape = tuple(cache.moments.shape[3:])
        self.flip = cache.moments.shape[1] == 2

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, idx: np.ndarray, flips: np.ndarray) -> np.ndarray:
        o = flips.astype(np.int64) if self.flip else np.zeros(len(idx), dtype=np.int64)
        order = np.argsort(idx, kind="stable")  # sorted reads are kinder to a memory map
        out = np.empty((len(idx), *self.cache.moments.shape[2:]), dtype=np.float32)
        out[order] = self.cache.moments[idx[order], o[order]]
        return out

    def to_x0(self, payload: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        return sample_latents(payload[:, 0], payload[:, 1], eps, self.scale)


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset indexed by step number: item ``s`` is this rank's (payload, labels) of step ``s``."""

    def __init__(self, source, order):
        self.source = source
        self.order = order

    def __len__(self) -> int:  # effectively unbounded; indexed by step
        return 2**62

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx, flips = self.order.local_items(int(step))
        payload = self.source.load(idx, flips)
        return torch.from_numpy(np.ascontiguousarray(payload)), torch.from_numpy(self.source.labels[idx].copy())
