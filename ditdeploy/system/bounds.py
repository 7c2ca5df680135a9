"""Early bounds: sizes a run will need, checked before the work with a one-line error that says how much.

- :func:`check_memory`: a count (images, samples, batch, probe size) times its per-item bytes against the memory
  available now;
- :func:`check_npz`: every member of an ``.npz`` is read from its ``.npy`` header (declared shape and dtype) and
  compared with the zip's declared size and a byte limit *before* anything is inflated, so a small compressed file
  cannot allocate gigabytes.

numpy + stdlib (+ psutil, a core dependency) only: deploy path.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from ditdeploy.artifact.output_policy import human_bytes
from ditdeploy.errors import ArtifactError, DitDeployError

__all__ = ["MAX_BATCH", "available_memory", "check_batch", "check_memory", "check_model", "check_npz",
           "check_threads", "max_threads"]

#: share of the available memory a run may plan to use
MEMORY_SHARE = 0.9
#: the largest batch any command takes (a TensorRT profile's max, a check or bench batch); larger ones are chunked
MAX_BATCH = 4096


def available_memory() -> int:
    """Bytes of memory available to this process now (psutil's ``available``; the cgroup limit if lower)."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            lim = Path(f).read_text().strip()
        except OSError:
            continue
        if lim.isdigit() and int(lim) < avail:
            cur = Path(f).with_name("memory.current" if f.endswith(".max") else "memory.usage_in_bytes")
            try:
                used = int(cur.read_text().strip())
            except (OSError, ValueError):
                used = 0
            avail = max(0, int(lim) - used)
    import resource

    soft = resource.getrlimit(resource.RLIMIT_AS)[0]  # ulimit -v
    if soft != resource.RLIM_INFINITY:
        avail = min(avail, max(0, soft - psutil.Process().memory_info().vms))
    return avail


def check_memory(count: int, item_bytes: int, what: str, hint: str) -> None:
    """Refuse ``count`` items of ``item_bytes`` each when they do not fit in the available memory.

    ``what`` names the count (e.g. ``"1000000 images"``), ``hint`` how to lower it.
    """
    need = int(count) * int(item_bytes)
    avail = available_memory()
    if need > MEMORY_SHARE * avail:
        raise DitDeployError(f"{what} need about {human_bytes(need)} of memory, {human_bytes(avail)} available: {hint}")


def check_batch(n: int | None, flag: str) -> None:
    """Refuse a batch size below 1 or above :data:`MAX_BATCH` (one line, before any work)."""
    if n is not None and not 1 <= n <= MAX_BATCH:
        raise DitDeployError(f"{flag} {n} is out of range: batches are 1..{MAX_BATCH} (larger runs are chunked)")


def check_model(cfg: object, what: str = "the model") -> None:
    """Refuse a model config whose fp32 parameters do not fit in memory (before anything is allocated)."""
    n = int(cfg.param_count())  # type: ignore[attr-defined]
    check_memory(n, 4, f"the {n:,} fp32 parameters of {what}", "check the sizes in its config (hidden_size, "
                 "depth, input_size, num_classes)")


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], int, int]:
    """(shape, itemsize, header bytes) of an ``.npy`` member, read without inflating its data."""
    import numpy as np

    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            shape, _, dtype = np.lib.format._read_array_header(f, version)
        if dtype.hasobject:  # pickled objects: np.load(allow_pickle=False) refuses them, nothing to size here
            return tuple(int(d) for d in shape), -1, f.tell()
        return tuple(int(d) for d in shape), int(dtype.itemsize), f.tell()


def check_npz(path: str | os.PathLike, max_bytes: int | None = None, what: str = "npz file",
              only: tuple[str, ...] | None = None) -> dict[str, tuple]:
    """Check every member's (or, with ``only``, those members') declared size of the ``.npz`` at ``path`` before it
    is inflated.

    Each ``.npy`` member's header shape x itemsize must match the zip's declared uncompressed size (a mismatch is a
    damaged or crafted file), and the total must fit in ``max_bytes`` (default: the memory available now).
    Returns ``{member: shape}``. ArtifactError (one line) otherwise.
    """
    path = Path(path)
    limit = max_bytes if max_bytes is not None else int(MEMORY_SHARE * available_memory())
    shapes: dict[str, tuple] = {}
    total = 0
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.is_dir() or (only is not None and info.filename[:-4] not in only):
                    continue
                if not info.filename.endswith(".npy"):
                    raise ArtifactError(f"{what} {path.name} holds {info.filename!r}, which is not an array")
                shape, itemsize, header = _member_header(zf, info)
                if itemsize < 0:
                    continue
                n = itemsize
                for d in shape:
                    n *= d
                if n + header != info.file_size:
                    raise ArtifactError(f"{what} {path.name}: member {info.filename} declares {human_bytes(n)} of "
                                        f"data but holds {human_bytes(max(0, info.file_size - header))}: the file is "
                                        "damaged")
                total += n
                shapes[info.filename[:-4]] = shape
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ArtifactError(f"{path} is not a readable {what} .npz ({' '.join(str(e).split())})") from e
    if total > limit:
        raise ArtifactError(f"{what} {path.name} inflates to {human_bytes(total)}, more than the "
                            f"{human_bytes(limit)} this run can hold in memory")
    return shapes


def max_threads() -> int:
    """The most intra-op threads a run may ask for: 4x the logical CPUs (at least 64); beyond that a runtime spends
    its time creating threads (ONNX Runtime with 100000 threads does not finish starting)."""
    return max(64, 4 * (os.cpu_count() or 1))


def check_threads(n: int | None, flag: str = "--threads") -> None:
    """Refuse a thread count below 1 or above :func:`max_threads` (one line)."""
    if n is None:
        return
    if n < 1 or n > max_threads():
        raise DitDeployError(f"{flag} must be in 1..{max_threads()} (this machine has {os.cpu_count()} CPUs), got {n}")
