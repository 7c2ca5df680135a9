"""Artifacts on disk: atomic writes, sha256, and the JSON manifest that sits beside every exported file.

A manifest ``<artifact>.json`` (e.g. ``s2.onnx`` -> ``s2.onnx.json``) records what the artifact is (variant/config,
input size, channels, classes, precision, opset, calibration hash, tool versions), the sha256 of every file it
consists of, and parity numbers measured at export. The typed manifest lives in ``ditdeploy.artifact.manifest`` (with
its function-style entry points ``load_manifest`` / ``make_manifest``). Together with ``errors``, ``variants``,
``manifest``, ``outputs`` and ``formats`` this is the artifact layer: it imports nothing above it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ditdeploy.errors import ArtifactError, DitDeployError
from ditdeploy.system.interrupts import note_written

MANIFEST_VERSION = 1


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def manifest_path(artifact: str | os.PathLike) -> Path:
    """Path of the manifest that belongs to ``artifact``."""
    p = Path(artifact)
    return p.with_name(p.name + ".json")


def _check_writable_dir(d: Path) -> None:
    if d.exists() and not d.is_dir():
        raise DitDeployError(f"cannot write into {d}: it is a file, not a directory; choose another --out")
    if not d.exists():
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DitDeployError(f"cannot create output directory {d}: {e.strerror}") from e
    if not os.access(d, os.W_OK):
        raise DitDeployError(f"output directory {d} is not writable: choose another --out")


def _default_mode(base: int = 0o666) -> int:
    """``base`` (0666: a file, 0777: a folder) minus the process umask (what a plain ``open(..., "w")`` or
    ``mkdir`` would give)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


# Temporary names carry the writer's pid, so a later run can tell the leftovers of a killed run from a live one's.
TEMP_TAG = "ditdeploy"
_TEMP_FILE_RE = re.compile(rf"^\..+\.{TEMP_TAG}-(\d+)-[A-Za-z0-9_]{{8}}(\.[A-Za-z0-9]+)?$")
_TEMP_DIR_RE = re.compile(rf"^\.{TEMP_TAG}-(?:[a-z0-9]+-)?(\d+)-[A-Za-z0-9_]{{8}}$")


def temp_prefix(final_name: str | None = None, kind: str = "") -> str:
    """Prefix of a temporary file (``final_name`` given) or folder (``kind``, e.g. ``shards``) made by this process."""
    if final_name is not None:
        return f".{final_name}.{TEMP_TAG}-{os.getpid()}-"
    return f".{TEMP_TAG}-{kind + '-' if kind else ''}{os.getpid()}-"


@contextlib.contextmanager
def temp_dir(parent: str | os.PathLike | None = None, kind: str = "") -> Iterator[Path]:
    """A private temporary folder in ``parent`` (default: the system temp dir) named with this process's pid, so the
    next run removes it if this one is killed (:func:`clean_stale_temps`, run here first); removed on every exit."""
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    clean_stale_temps(parent)
    try:
        d = Path(tempfile.mkdtemp(prefix=temp_prefix(kind=kind), dir=parent))
    except OSError as e:
        raise DitDeployError(f"could not create a temporary folder in {parent}: {e.strerror or e}") from e
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files/folders that a killed ditdeploy run left in ``folder`` (their pid is gone).

    Returns the names removed and says so in one line on stderr. Temporaries of live processes are left alone.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMP_FILE_RE.match(name) or _TEMP_DIR_RE.match(name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        p = Path(folder) / name
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(name)
    if removed:
        shown = ", ".join(removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
        _note(f"note: removed {len(removed)} temporary file(s) left in {folder} by an interrupted run: {shown}")
    return removed


def _note(line: str) -> None:
    import sys

    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            print(line, file=sys.stderr)


def _resolve_final(final: Path, *, through_ok: bool) -> tuple[Path, bool]:
    """Policy at write time (ditdeploy.artifact.output_policy): follow symlinks; a device/FIFO is written through or refused."""
    from ditdeploy.artifact.output_policy import WRITE_THROUGH, file_kind, final_path

    final = final_path(final)
    kind = file_kind(final)
    if kind == "directory":
        raise DitDeployError(f"cannot write {final}: it is a directory")
    if kind in ("missing", "regular"):
        return final, False
    if through_ok and kind in WRITE_THROUGH:
        return final, True
    raise DitDeployError(f"cannot write {final}: it is a {kind}, not a regular file (it is never replaced)")


@contextlib.contextmanager
def _through_path(final: Path, suffix: str | None) -> Iterator[Path]:
    """Write into a temporary file elsewhere, then copy its bytes into the device/FIFO ``final`` (like ``cp``)."""
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(final.name), suffix=suffix or ".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as src, open(final, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except OSError as e:
        if isinstance(e, DitDeployError):
            raise
        raise DitDeployError(f"could not write {final}: {e.strerror or e}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the final file's directory; rename it onto ``final`` only on success.

    On any exception the temporary file is removed and ``final`` is untouched, so an interrupted or failed write
    never leaves a partial file at the final path. An existing character device or FIFO (or a symlink to one) is
    written through, never replaced; any other symlink is replaced, its target untouched (``ditdeploy.artifact.output_policy``).
    """
    final, through = _resolve_final(Path(final), through_ok=True)
    if through:
        with _through_path(final, suffix) as tmp:
            yield tmp
        return
    _check_writable_dir(final.parent)
    clean_stale_temps(final.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(final.name), suffix=suffix or ".tmp", dir=final.parent)
    except OSError as e:
        raise DitDeployError(f"could not write {final}: {e.strerror or e}") from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _default_mode())  # mkstemp makes 0600; published artifacts get the usual umask mode
        os.replace(tmp_path, final)
        note_written(final)
    except BaseException as e:
        if not tmp_path.exists() and final.exists():  # renamed into place just before a signal: it is complete
            note_written(final)
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(e, OSError) and not isinstance(e, DitDeployError):
            raise DitDeployError(f"could not write {final}: {e.strerror or e}") from e
        raise


def _keep_old(final: Path, backup: Path) -> bool:
    """Hard-link (else copy) an existing ``final`` to ``backup`` so a failed publish can put it back."""
    if not final.exists():
        return False
    try:
        os.link(final, backup)
    except OSError:
        shutil.copy2(final, backup)
    return True


def publish(tmp: Path, finals: list[Path]) -> None:
    """Move ``tmp/<name>`` onto each final path as one unit: data first, manifest last; if any move fails, every
    file already moved is taken back (the previous version restored) and the error is raised."""
    backups = tmp / f".{TEMP_TAG}-old"
    backups.mkdir(exist_ok=True)
    done: list[tuple[Path, bool]] = []
    try:
        for f in finals:
            src = tmp / f.name
            if not src.exists():
                continue
            had_old = _keep_old(f, backups / f.name)
            os.replace(src, f)
            done.append((f, had_old))
    except BaseException:
        for f, had_old in reversed(done):
            with contextlib.suppress(OSError):
                if had_old:
                    os.replace(backups / f.name, f)
                else:
                    f.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(final_files: list[str | os.PathLike]) -> Iterator[Path]:
    """Yield a temporary directory; on success move each named file from it to its final path, as a unit.

    Used for multi-file artifacts (an ONNX model with external data plus its manifest). Files are moved
    data-first and the manifest last, so a reader never sees a manifest without its data, and if a move fails
    (e.g. the manifest cannot be written) the files already moved are taken back (:func:`publish`). A device, FIFO
    or other non-regular file (or a symlink to one) at a final path is refused, never replaced.
    """
    finals = [_resolve_final(Path(p), through_ok=False)[0] for p in final_files]
    parent = finals[0].parent
    _check_writable_dir(parent)
    clean_stale_temps(parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=parent))
    except OSError as e:
        raise DitDeployError(f"could not write {parent}: {e.strerror or e}") from e
    try:
        yield tmp
        publish(tmp, finals)
        for f in finals:
            note_written(f)
    except BaseException as e:
        if isinstance(e, OSError) and not isinstance(e, DitDeployError):
            shutil.rmtree(tmp, ignore_errors=True)
            raise DitDeployError(f"could not write {parent}: {e.strerror or e}") from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_new_folder(final: str | os.PathLike) -> Path:
    """Refuse (one line) a folder-artifact destination that exists and is not an empty folder, or is a link; create
    its parent. Returns the path."""
    from ditdeploy.artifact.output_policy import check_new_folder as policy

    final = Path(final)
    policy("--out", final)  # a link, a file or device, a non-empty folder, a path below a file: one line
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DitDeployError(f"could not create {final.parent}: {e.strerror or e}") from e
    _check_writable_dir(final.parent)
    return final


def folder_files(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The ``files`` table of a folder artifact: sha256 and size of every file under ``root``, by relative path."""
    root = Path(root)
    return {str(f.relative_to(root)): {"sha256": sha256_file(f), "bytes": f.stat().st_size}
            for f in sorted(root.rglob("*")) if f.is_file()}


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``final``; rename it to ``final`` only on success (a folder artifact:
    a diffusers snapshot, a Triton model repository). ``final`` must be new or an empty folder (never a link): an
    existing folder's content is never replaced or merged into. On any exception the temporary folder is removed."""
    final = check_new_folder(final)
    clean_stale_temps(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(kind="folder"), dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, _default_mode(0o777))  # mkdtemp makes 0700; a published folder gets the umask's mode
        if final.is_dir():
            final.rmdir()  # empty (checked above)
        os.replace(tmp, final)
        note_written(final)
    except BaseException as e:
        if not tmp.exists() and final.is_dir():  # renamed into place just before a signal: it is complete
            note_written(final)
        if isinstance(e, OSError) and not isinstance(e, DitDeployError):
            raise DitDeployError(f"could not write {final}: {e.strerror or e}") from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify_folder(root: str | os.PathLike, manifest_name: str) -> dict[str, Any]:
    """Read the manifest ``root/manifest_name`` of a folder artifact and check that every file it lists exists with
    its recorded sha256; returns the manifest. One-line ArtifactError otherwise."""
    root = Path(root)
    try:
        m = json.loads((root / manifest_name).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{root}: no readable {manifest_name} ({e}); write the folder again") from e
    files = m.get("files") if isinstance(m, dict) else None
    for name, rec in (files.items() if isinstance(files, dict) else ()):
        f = safe_member(root, name)
        want = rec.get("sha256") if isinstance(rec, dict) else None
        if not f.is_file() or sha256_file(f) != want:
            raise ArtifactError(f"{root}: {name} is missing or differs from the sha256 its {manifest_name} records: "
                                "the folder is damaged; copy or write it again")
    return m


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_file_atomic(path: str | os.PathLike, src: str | os.PathLike) -> None:
    """Copy the file ``src`` to ``path`` atomically (written through when ``path`` is a device or FIFO)."""
    with atomic_path(path) as tmp:
        shutil.copyfile(src, tmp)


def json_text(obj: Any) -> str:
    """The project's JSON text for ``obj``: 2-space indent, sorted keys, numpy scalars/arrays and paths converted,
    strict JSON (a NaN or infinite number is written as ``null``: ``NaN``/``Infinity`` are not JSON)."""
    return json.dumps(strict_json(obj), indent=2, sort_keys=True, default=_json_default, allow_nan=False) + "\n"


def strict_json(obj: Any) -> Any:
    """``obj`` with numpy values as Python ones and every non-finite float as None (valid JSON for any reader)."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(obj, (np.generic, np.ndarray)):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as pretty JSON atomically."""
    write_bytes_atomic(path, json_text(obj).encode())


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def tool_versions() -> dict[str, str]:
    """Versions of the libraries that matter for reproducing an artifact (only those already importable)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("ditdeploy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "openvino",
                 "tensorrt", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


def safe_member(base: Path, name: str) -> Path:
    """Resolve a file name from a manifest inside ``base``; refuse names that escape it (``..``, absolute)."""
    if not isinstance(name, str) or not name or "\x00" in name or os.path.isabs(name) or Path(name).drive:
        raise ArtifactError(f"manifest names an unsafe path {name!r}: only files beside the artifact are allowed")
    p = (base / name).resolve()
    if p != base.resolve() and base.resolve() not in p.parents:
        raise ArtifactError(f"manifest names a path outside its directory: {name!r}")
    return p


# diffusers snapshot folders (an artifact kind the readers recognise; ditdeploy.sources.diffusers_snapshot reads and writes them)
SNAPSHOT_INDEX = "model_index.json"
DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


def is_snapshot_dir(path: str | os.PathLike) -> bool:
    """True for a folder with ``model_index.json``, or with a ``config.json`` of a DiT transformer."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / SNAPSHOT_INDEX).is_file():
        return True
    cfg = p / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("_class_name") in DIT_CLASSES
    except (OSError, ValueError, AttributeError, RecursionError):
        return False
