"""Images out of a sampler: [-1, 1] float -> uint8 NHWC, a labelled PNG grid, and the ADM-layout ``.npz``.

numpy + Pillow only (deploy path). The uint8 conversion is the one the official DiT ``sample_ddp.py`` uses:
``clamp(127.5 * x + 128, 0, 255)`` truncated to uint8, so FID numbers are comparable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from ditdeploy.artifact.files import atomic_path
from ditdeploy.errors import DitDeployError

__all__ = ["grid", "load_npz", "save_npz", "save_png", "to_uint8"]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) float images in [-1, 1] -> (N, H, W, C) uint8 (C = 1 or 3)."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise DitDeployError(f"images must be (N, C, H, W), got shape {x.shape}")
    x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    u8 = np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(u8.transpose(0, 2, 3, 1))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (scalable when FreeType is available)
    except TypeError:  # pragma: no cover - older Pillow
        return ImageFont.load_default()


def grid(
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray | None = None,
    *,
    cols: int | None = None,
    tile: int | None = None,
    class_names: Sequence[str] | None = None,
    pad: int = 2,
):
    """A PIL RGB image of uint8 NHWC ``images`` laid out in rows of ``cols``, each labelled with its class.

    When every row holds one class (e.g. ``--num-per-label K`` with ``cols=K``) the label is written once at the
    left of the row; otherwise under each tile. Small images are upscaled (nearest) to ``tile`` px (default: at
    least 64 px) so 8x8 digits are legible.
    """
    from PIL import Image, ImageDraw

    imgs = np.asarray(images)
    if imgs.ndim != 4 or imgs.dtype != np.uint8 or imgs.shape[-1] not in (1, 3):
        raise DitDeployError(f"grid() takes uint8 (N, H, W, 1|3) images, got {imgs.dtype} {imgs.shape}")
    n, h, w, _ = imgs.shape
    if n == 0:
        raise DitDeployError("no images to put in a grid")
    cols = max(1, min(cols or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / cols)
    scale = max(1, (tile or 64) // max(h, w)) if (tile or max(h, w) < 64) else 1
    th, tw = h * scale, w * scale
    labs = None if labels is None else [int(v) for v in np.asarray(labels).ravel()]
    if labs is not None and len(labs) != n:
        raise DitDeployError(f"{len(labs)} labels for {n} images")

    def name(v: int) -> str:
        return class_names[v] if class_names is not None and 0 <= v < len(class_names) else str(v)

    row_mode = labs is not None and all(len({labs[i] for i in range(r * cols, min(n, (r + 1) * cols))}) == 1
                                        for r in range(rows))
    fsize = max(10, min(24, th // 4))
    font = _font(fsize)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(s: str) -> int:
        box = probe.textbbox((0, 0), s, font=font)
        return box[2] - box[0]

    left = (max(text_w(name(v)) for v in labs) + 2 * pad + 4) if row_mode else 0
    cap = 0 if (labs is None or row_mode) else fsize + 2 * pad
    W = left + cols * (tw + pad) + pad
    H = rows * (th + cap + pad) + pad
    canvas = Image.new("RGB", (W, H), (235, 235, 235))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        x0 = left + pad + c * (tw + pad)
        y0 = pad + r * (th + cap + pad)
        a = imgs[i]
        tile_img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB")
        if scale > 1:
            tile_img = tile_img.resize((tw, th), Image.NEAREST)
        canvas.paste(tile_img, (x0, y0))
        if labs is not None and not row_mode:
            draw.text((x0 + 1, y0 + th + pad // 2), name(labs[i]), fill=(0, 0, 0), font=font)
    if row_mode:
        for r in range(rows):
            y0 = pad + r * (th + pad) + (th - fsize) // 2
            draw.text((pad + 2, y0), name(labs[r * cols]), fill=(0, 0, 0), font=font)
    return canvas


def save_image(image, path: str | os.PathLike, fmt: str = "PNG") -> None:
    """Write a PIL image atomically (nothing half-written at ``path``) in PIL format ``fmt`` (PNG, JPEG, ...)."""
    opts = {"quality": 95} if fmt == "JPEG" else {}
    with atomic_path(path, suffix="." + fmt.lower()) as tmp:
        image.save(tmp, format=fmt, **opts)


def save_png(image, path: str | os.PathLike) -> None:
    """Write a PIL image as PNG atomically (nothing half-written at ``path``)."""
    save_image(image, path, "PNG")


def save_npz(path: str | os.PathLike, images_u8: np.ndarray, labels: np.ndarray, **extra: np.ndarray) -> None:
    """Write ``arr_0`` (N, H, W, C) uint8 and ``labels`` (N,) int64 (the ADM evaluator's layout) atomically."""
    arr = np.asarray(images_u8)
    if arr.ndim != 4 or arr.dtype != np.uint8:
        raise DitDeployError(f"npz arr_0 must be uint8 (N, H, W, C), got {arr.dtype} {arr.shape}")
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:  # a file object: no ".npz" appended
        np.savez(f, arr_0=arr, labels=np.asarray(labels, dtype=np.int64), **extra)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an ``.npz`` written by :func:`save_npz` into a dict of arrays."""
    from ditdeploy.system.bounds import check_npz

    check_npz(path)  # declared sizes before anything is inflated
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DitDeployError(f"cannot read {path}: {e}") from e
