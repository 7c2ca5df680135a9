"""Training data: ImageNet-layout ImageFolder, scikit-learn's 8x8 digits, and a deterministic per-step order.

ImageFolder images get the ADM center crop + flip.

The order is a pure function of ``(seed, epoch)``: each epoch is a permutation of the dataset (plus one flip
bit per image), cut into global batches (the remainder is dropped, like ``drop_last``); rank r of W takes the
r-th W-th of each global batch. So a run can resume at any step and get exactly the batches it would have
seen, and the union of all ranks' batches is independent of the number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ditdeploy.errors import DitDeployError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Held-out split of the 1797 scikit-learn digits: a fixed permutation (seed 0); the first 297 are held out (used by
# experiments/digits_quality.py to score the classifier and as the "real unseen digits" memorisation baseline).
DIGITS_HELD_OUT = 297


def center_crop_arr(pil_image, image_size: int):
    """ADM / DiT center crop: halve with BOX filtering while the short side is >= 2x the target, resize the short
    side to ``image_size`` (BICUBIC, rounded sizes), then crop the centre square."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top : top + image_size, left : left + image_size])


@dataclass(frozen=True)
class ImageFolderIndex:
    """Files and labels of an ImageNet-layout folder: ``root/<class>/**/<image>``; classes sorted by name."""

    root: str
    paths: tuple[str, ...]
    labels: np.ndarray  # int64 (N,)
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """sha256 over relative paths and sizes: identifies the data a latent cache was built from."""
        import hashlib

        h = hashlib.sha256()
        for p in self.paths:
            h.update(os.path.relpath(p, self.root).encode())
            h.update(str(os.path.getsize(p)).encode())
        return h.hexdigest()


def scan_image_folder(root: str | os.PathLike) -> ImageFolderIndex:
    """Index an ImageFolder; one-line errors for a missing folder, no class folders, or no images."""
    root = Path(root)
    if not root.exists():
        raise DitDeployError(f"data folder {root} does not exist: pass --data DIR with one sub-folder per class")
    if not root.is_dir():
        raise DitDeployError(f"--data {root} is not a folder: pass a folder with one sub-folder per class")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DitDeployError(f"data folder {root} has no class sub-folders (ImageNet layout: {root}/<class>/<img>)")
    paths: list[str] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        for dirpath, dirnames, files in sorted(os.walk(root / c, followlinks=True)):
            dirnames.sort()
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(i)
    if not paths:
        raise DitDeployError(f"data folder {root} contains no images ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    return ImageFolderIndex(str(root), tuple(paths), np.asarray(labels, dtype=np.int64), tuple(classes))


def load_image(path: str, image_size: int, flip: bool) -> np.ndarray:
    """RGB image -> center crop -> optional horizontal flip -> float32 (3, S, S) in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise DitDeployError(f"cannot read image {path}: {e}; remove or replace the file") from e
    arr = np.asarray(center_crop_arr(im, image_size), dtype=np.float32)
    if flip:
        arr = arr[:, ::-1]
    arr = (arr / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64 0..16, labels) of scikit-learn's bundled digits.

    Reads the bundled ``datasets/data/digits.csv.gz`` directly when it is where it has always been (what
    ``load_digits`` parses; importing ``sklearn.datasets`` costs seconds per process), else calls ``load_digits``.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for base in (spec.submodule_search_locations or []) if spec else []:
        f = Path(base) / "datasets" / "data" / "digits.csv.gz"
        if f.is_file():
            data = np.loadtxt(f, delimiter=",")
            if data.shape == (1797, 65):
                return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(np.int64)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 scikit-learn digits as float32 (N, 1, 8, 8) in [-1, 1] (0..16 -> -1..1) and int64 labels."""
    images, labels = _digits_raw()
    x = (images.astype(np.float32) / np.float32(16.0)) * np.float32(2.0) - np.float32(1.0)
    return x[:, None], labels


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) of the digits preset, fixed forever (seed 0 permutation)."""
    perm = np.random.default_rng(0).permutation(1797)
    return np.sort(perm[DIGITS_HELD_OUT:]), np.sort(perm[:DIGITS_HELD_OUT])


def digits_train() -> tuple[np.ndarray, np.ndarray]:
    """The digits preset's training images and labels."""
    x, y = digits_arrays()
    tr, _ = digits_split()
    return x[tr], y[tr]


class EpochOrder:
    """Deterministic batches: permutation and flip bits per epoch from ``(seed, epoch)``; drop-last global batches."""

    def __init__(self, num_items: int, global_batch: int, seed: int, world_size: int = 1, rank: int = 0):
        if global_batch <= 0:
            raise DitDeployError(f"--global-batch must be positive, got {global_batch}")
        if global_batch % world_size:
            raise DitDeployError(f"--global-batch {global_batch} is not divisible by the {world_size} ranks")
        if num_items < global_batch:
            raise DitDeployError(
                f"the dataset has {num_items} items, fewer than --global-batch {global_batch}: lower the batch"
            )
        self.n = num_items
        self.global_batch = global_batch
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = num_items // global_batch

    @lru_cache(maxsize=2)  # noqa: B019 - tiny cache, object lives for the run
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.n), rng.random(self.n) < 0.5

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_items(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, flip bits) of the whole global batch of ``step`` (0-based)."""
        perm, flips = self._epoch(step // self.steps_per_epoch)
        b = step % self.steps_per_epoch
        idx = perm[b * self.global_batch : (b + 1) * self.global_batch]
        return idx, flips[idx]

    def local_items(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of the global batch of ``step``."""
        idx, flips = self.global_items(step)
        s = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        return idx[s], flips[s]

    def state(self, step: int) -> dict[str, int]:
        """Plain-data description of the data position after ``step`` completed steps (stored in checkpoints)."""
        return {"seed": self.seed, "num_items": self.n, "global_batch": self.global_batch,
                "epoch": step // self.steps_per_epoch, "batch_in_epoch": step % self.steps_per_epoch}
