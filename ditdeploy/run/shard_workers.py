"""Multi-process sampling for large N (e.g. 50K images for FID): split, run shards, merge their npz parts.

Every image has a global index ``0..N-1``; its noise derives from ``(seed, global index)`` only
(:mod:`ditdeploy.run.noise_contract`), so how the N images are split over shards and batches does not change them.
Shard ``i`` of ``k`` takes the contiguous range :func:`shard_range`, writes ``<npz stem>.part-i-of-k.npz``
atomically (``arr_0``, ``labels``, ``index``), and :func:`merge_parts` streams the parts into the final npz in
global index order (memory: one part at a time).

Two ways to run shards:
- ``ditdeploy sample --shards K``: this process spawns K worker processes (``python -m ditdeploy.run.generation``
  with a JSON request for shard i/K), each with ``cores // K`` threads, waits, and merges.
- under ``torchrun`` (or any launcher that sets ``RANK`` / ``WORLD_SIZE``): every rank samples its range and
  writes its part; rank 0 then waits for the other parts and merges. No torch import is involved.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ditdeploy.artifact.files import atomic_path
from ditdeploy.errors import DitDeployError

__all__ = ["dist_env", "merge_parts", "parse_shard", "part_path", "run_workers", "shard_range", "wait_for_parts"]


def shard_range(n: int, index: int, count: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of shard ``index`` of ``count`` over ``n`` items (sizes differ by at most 1)."""
    if count < 1 or not 0 <= index < count:
        raise DitDeployError(f"shard {index}/{count} is invalid: need 0 <= index < count")
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/k"`` -> ``(i, k)``."""
    try:
        i, k = (int(v) for v in spec.split("/"))
    except ValueError as e:
        raise DitDeployError(f"--shard takes INDEX/COUNT like 0/4, got {spec!r}") from e
    shard_range(0, i, k)  # validates
    return i, k


def dist_env() -> tuple[int, int] | None:
    """``(rank, world_size)`` from a launcher's environment variables, or None when not launched so.

    ``RANK`` / ``WORLD_SIZE`` left over in a shell (no ``LOCAL_RANK``, which torchrun and the other launchers set
    too) are named in one DitDeployError instead of making rank 0 wait for parts no one will write.
    """
    raw = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    try:
        world = int(raw["WORLD_SIZE"] or "1")
        rank = int(raw["RANK"] or "0")
    except ValueError as e:
        raise DitDeployError(f"RANK/WORLD_SIZE are not integers: {e}") from e
    if world <= 1 and raw["RANK"] in (None, "0"):
        return None
    if raw["LOCAL_RANK"] is None or world <= 1 or not 0 <= rank < world:
        shown = " ".join(f"{k}={v}" for k, v in raw.items() if v is not None)
        raise DitDeployError(f"{shown} in the environment but this is not a launcher's run (torchrun sets RANK, "
                             "WORLD_SIZE and LOCAL_RANK): unset them for one process, or use --shards N")
    return rank, world


def part_path(final: str | os.PathLike, index: int, count: int) -> Path:
    """Where shard ``index`` of ``count`` writes its part of ``final``."""
    f = Path(final)
    stem = f.name[: -len(".npz")] if f.name.endswith(".npz") else f.name
    return f.with_name(f"{stem}.part-{index:05d}-of-{count:05d}.npz")


def _npy_header(fp, shape: tuple[int, ...], dtype: np.dtype) -> None:
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    try:
        np.lib.format.write_array_header_1_0(fp, d)
    except ValueError:  # header too large for format 1.0
        np.lib.format.write_array_header_2_0(fp, d)


def merge_parts(final: str | os.PathLike, parts: Sequence[str | os.PathLike], n: int | None = None,
                remove: bool = True) -> tuple[int, tuple[int, ...]]:
    """Merge shard parts into ``final`` (``arr_0`` uint8 NHWC, ``labels``) in global index order.

    Checks that the parts' ``index`` arrays cover ``0..n-1`` exactly once. Streams ``arr_0`` part by part into the
    zip member, so peak memory is one part. Returns ``(N, image shape)``. Removes the parts on success if
    ``remove``.
    """
    infos = []
    for p in parts:
        p = Path(p)
        if not p.exists():
            raise DitDeployError(f"shard part {p} is missing: a shard failed or has not finished")
        from ditdeploy.system.bounds import check_npz

        check_npz(p, what="shard part")
        with np.load(p) as z:
            for k in ("arr_0", "labels", "index"):
                if k not in z.files:
                    raise DitDeployError(f"shard part {p} lacks {k!r}: not written by `ditdeploy sample`")
            idx = z["index"]
            shape = z["arr_0"].shape
            dtype = z["arr_0"].dtype
        infos.append((int(idx.min()) if idx.size else 0, p, idx, shape, dtype))
    infos.sort(key=lambda r: r[0])
    # parts in order of their first index, each sorted, must spell out 0..n-1: contiguous, no gaps/duplicates
    ordered = np.concatenate([np.sort(r[2]) for r in infos]) if infos else np.zeros(0, np.int64)
    total = int(ordered.size)
    if n is None:
        n = total
    if total != n or not np.array_equal(ordered, np.arange(n)):
        raise DitDeployError(
            f"shard parts cover {total} images with gaps, overlaps or interleaving; expected indices 0..{n - 1}"
        )
    shapes = {r[3][1:] for r in infos if r[3][0]}
    if len(shapes) > 1:
        raise DitDeployError(f"shard parts have different image shapes {sorted(shapes)}")
    img_shape = shapes.pop() if shapes else (0, 0, 0)
    dtype = infos[0][4] if infos else np.dtype(np.uint8)
    labels = np.empty(n, dtype=np.int64)
    with atomic_path(final, suffix=".npz") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as fp:
                _npy_header(fp, (n, *img_shape), dtype)
                for _, p, idx, _, _ in infos:
                    with np.load(p) as z:
                        arr, lab = z["arr_0"], z["labels"]
                    order = np.argsort(idx, kind="stable")
                    arr, idx_sorted = arr[order], idx[order]
                    labels[idx_sorted] = lab[order]
                    fp.write(np.ascontiguousarray(arr).tobytes())
            with zf.open("labels.npy", "w", force_zip64=True) as fp:
                np.lib.format.write_array(fp, labels)
    if remove:
        for _, p, *_ in infos:
            Path(p).unlink(missing_ok=True)
    return n, tuple(img_shape)


def wait_for_parts(parts: Sequence[Path], timeout: float = 24 * 3600.0, poll: float = 2.0) -> None:
    """Block until every part exists (torchrun rank 0 waiting for the others); DitDeployError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [p for p in parts if not Path(p).exists()]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise DitDeployError(f"timed out after {timeout:.0f} s waiting for {len(missing)} shard part(s) of the "
                                 f"other ranks, e.g. {missing[0]}: did every rank start?")
        time.sleep(poll)


def _worker_preexec() -> None:  # pragma: no cover - runs in the child
    """Own process group (a terminal's Ctrl-C reaches the parent only, which forwards it once) and SIGTERM when the
    parent dies (Linux), so no worker outlives it."""
    os.setpgrp()
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_workers(procs: Sequence[subprocess.Popen], signum: int, grace: float = 30.0) -> None:
    """Forward ``signum`` to every live worker, wait for them to unwind (each removes its temporary file), and
    SIGKILL any still running after ``grace`` seconds."""
    import signal

    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signum)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()


def run_workers(commands: Sequence[Sequence[str]], env: dict[str, str] | None = None) -> None:
    """Run every command (one shard worker each, e.g. ``python -m ditdeploy.run.generation shard-i.json``) in parallel.

    Waits for all; a failing shard raises a one-line DitDeployError with its last stderr line. When this process is
    interrupted (SIGINT, SIGTERM, SIGHUP) the signal is forwarded to every worker and they are waited for before the
    interruption goes on, so no worker keeps running or writing after the parent has cleaned up.
    """
    import signal

    from ditdeploy.system import interrupts

    procs: list[subprocess.Popen] = []
    base_env = {**os.environ, **(env or {})}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # workers must not think they run under torchrun
        base_env.pop(k, None)
    count = len(commands)
    try:
        for cmd in commands:
            procs.append(subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=base_env,
                                          text=True, preexec_fn=_worker_preexec))
        errs = [p.communicate()[1] for p in procs]
    except BaseException as e:
        sig = getattr(e, "signum", None) or interrupts.received() or \
            (signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM)
        stop_workers(procs, sig)
        raise
    errors = []
    for i, (p, err) in enumerate(zip(procs, errs, strict=True)):
        if p.returncode != 0:
            lines = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
            errors.append(f"shard {i}/{count} failed (exit {p.returncode}): {lines[-1] if lines else 'no output'}")
    if errors:
        raise DitDeployError("; ".join(errors))
