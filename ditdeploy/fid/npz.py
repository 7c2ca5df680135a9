"""Streaming reads of ADM-layout ``.npz`` files: ``arr_0`` uint8 (N, H, W, C) in batches, never all at once.

An ``.npz`` is a zip of ``.npy`` members; ``arr_0.npy`` is read member-wise from the zip (stored or deflated alike)
after its ``.npy`` header, so 50K 256x256 images cost one batch of memory. Small members (ADM's precomputed ``mu``,
``sigma``, ``mu_s``, ``sigma_s``) are read whole with ``np.load`` (no pickles).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ditdeploy.errors import DitDeployError

__all__ = ["ImageNpz"]

LAYOUT = "arr_0 uint8 (N, H, W, C) with C = 1 or 3 (ADM layout, what `ditdeploy sample --npz` writes)"


class ImageNpz:
    """An ``.npz`` file's members and, when present, its ``arr_0`` image array read in batches."""

    def __init__(self, path: str | os.PathLike, what: str = "samples"):
        self.path = Path(path)
        self.what = what
        if not self.path.is_file():
            why = "is not a regular file" if self.path.exists() else "not found"
            raise DitDeployError(f"{what} file {self.path} {why}")
        try:
            with zipfile.ZipFile(self.path) as z:
                self.members = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
        except (zipfile.BadZipFile, OSError) as e:
            raise DitDeployError(f"cannot read {what} file {self.path}: not an .npz archive ({e})") from e
        self.shape: tuple[int, ...] | None = None
        if "arr_0" in self.members:
            self.shape = self._header()

    @property
    def has_images(self) -> bool:
        return self.shape is not None

    def _header(self) -> tuple[int, ...]:
        with zipfile.ZipFile(self.path) as z, z.open("arr_0.npy") as f:
            try:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
            except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
                raise DitDeployError(f"{self.what} file {self.path}: arr_0 is not a valid .npy member "
                                     f"({' '.join(str(e).split())[:200]})") from e
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize + f.tell()
            stored = z.getinfo("arr_0.npy").file_size
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
            raise DitDeployError(f"{self.what} file {self.path}: arr_0 is {dtype} {tuple(shape)}; expected {LAYOUT}")
        if fortran:
            raise DitDeployError(f"{self.what} file {self.path}: arr_0 is stored in Fortran order; save it C-ordered")
        if declared != stored:  # checked before any batch is read: a header cannot claim images the file lacks
            raise DitDeployError(f"{self.what} file {self.path}: arr_0 declares {tuple(shape)} {dtype} but holds "
                                 f"{stored} bytes: the file is damaged")
        return tuple(int(v) for v in shape)

    def require_images(self) -> tuple[int, ...]:
        """The image array's shape, or a one-line error naming the layout when there is no ``arr_0``."""
        if self.shape is None:
            raise DitDeployError(f"{self.what} file {self.path} has no arr_0; expected {LAYOUT}")
        return self.shape

    def __len__(self) -> int:
        return self.shape[0] if self.shape is not None else 0

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive (b, H, W, C) uint8 batches of ``arr_0`` read from the zip member (one batch in memory)."""
        n, *rest = self.require_images()
        per = int(np.prod(rest))
        with zipfile.ZipFile(self.path) as z, z.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                buf = f.read(b * per)
                if len(buf) != b * per:
                    raise DitDeployError(f"{self.what} file {self.path}: arr_0 is truncated at image {start}")
                yield np.frombuffer(buf, dtype=np.uint8).reshape(b, *rest)

    def array(self, name: str) -> np.ndarray:
        """A small member (e.g. ``mu``) read whole, after its declared size was checked against the file and the
        memory available (``ditdeploy.system.bounds.check_npz``)."""
        from ditdeploy.system.bounds import check_npz

        check_npz(self.path, what=f"{self.what} file", only=(name,))
        try:
            with np.load(self.path, allow_pickle=False) as z:
                return np.asarray(z[name])
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DitDeployError(f"cannot read {name!r} from {self.path}: {' '.join(str(e).split())[:200]}") from e

    def gaussian(self, mu: str, sigma: str) -> tuple[np.ndarray, np.ndarray]:
        """Precomputed statistics (mean ``mu``, covariance ``sigma``), checked as :func:`check_gaussian` does."""
        from ditdeploy.fid.stats import check_gaussian

        return check_gaussian(self.array(mu), self.array(sigma), f"{self.what} file {self.path.name} ({mu}/{sigma})")
