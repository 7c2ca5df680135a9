"""The output-path policy every writing command applies before any work: never destroy what the run did not make.

``check_outputs(inputs, outputs, expected_bytes)`` refuses, in one line (``DitDeployError``):

- an output that is one of the run's inputs (same resolved path, or same device + inode: hard links and symlinks
  included), an existing file inside an input folder, or a file an input artifact consists of (its manifest, its
  external data);
- two outputs of the same run that name one file (resolved path or inode), including the files an artifact set writes
  beside itself (``X.json`` manifest, ``X.data`` external data, ``X.bin`` OpenVINO weights);
- a directory, a socket or a block device as an output, and any non-regular file as a part of an artifact set (an
  artifact needs a manifest beside it);
- a destination whose folder cannot be created or written, or lacks the free space the run is known to need.

An existing character device or FIFO (``/dev/null``, ``/dev/stdout``, a named pipe), or a symlink to one, given as a
single-file output (PNG, npz, JSON, CSV) is *written through* like ``cp`` does: the bytes go into it, it is never
replaced. Any other symlink at an output path is replaced by the new file; its target is never written.
The atomic writers in :mod:`ditdeploy.artifact.files` apply the same rules at write time (:func:`file_kind`,
:func:`final_path`), so a path that changes between the check and the write is still never replaced.

Standard library only (deploy path).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditdeploy.errors import DitDeployError

__all__ = ["OutputPlan", "artifact_files", "check_new_folder", "check_outputs", "file_kind", "final_path",
           "human_bytes"]

#: file kinds that may receive a single-file output by writing through (never replaced)
WRITE_THROUGH = ("character device", "FIFO")
#: free space kept in reserve beyond the expected size (file system metadata, temp + final during a rename)
SPACE_MARGIN = 1.05


def file_kind(p: str | os.PathLike) -> str:
    """What ``p`` is, following symlinks: missing | regular | directory | character device | block device | FIFO |
    socket | other."""
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError:
        return "other"
    m = st.st_mode
    for test, name in ((stat.S_ISREG, "regular"), (stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(m):
            return name
    return "other"


def final_path(p: str | os.PathLike) -> Path:
    """Where bytes written to ``p`` land: a symlink to a character device or FIFO (``/dev/stdout``) is followed and
    written through; any other symlink is itself replaced, its target never written (a planted link cannot redirect
    an output)."""
    p = Path(p)
    if p.is_symlink() and file_kind(p) in WRITE_THROUGH:
        return Path(os.path.realpath(p))
    return p


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def artifact_files(path: str | os.PathLike) -> list[Path]:
    """The files an exported artifact ``path`` consists of on disk: itself, its manifest, and by suffix its
    sidecars (``ditdeploy.artifact.formats``: external data ``.onnx.data``, OpenVINO weights ``.bin``)."""
    from ditdeploy.artifact.formats import sidecar_files

    p = Path(path)
    return [p, p.with_name(p.name + ".json"), *sidecar_files(p)]


@dataclass(frozen=True)
class Output:
    """One checked output: the flag that named it, the path given, where its bytes land, and whether it is an
    existing device/FIFO that is written through."""

    label: str
    path: Path
    final: Path
    through: bool


@dataclass(frozen=True)
class OutputPlan:
    """The outputs of a run after :func:`check_outputs`."""

    outputs: tuple[Output, ...]

    def through(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` is written through (an existing character device or FIFO)."""
        return any(o.through for o in self.outputs if o.path == Path(path))

    def check_space(self, expected_bytes: Mapping[str, int]) -> None:
        """Refuse (one line) when the outputs' file systems lack the bytes the run will write (per flag)."""
        _check_space(list(self.outputs), expected_bytes)


def _entries(spec: Mapping[str, Any] | None) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for label, v in (spec or {}).items():
        if v is None:
            continue
        vals = [v] if isinstance(v, (str, os.PathLike)) else list(v)
        out += [(label, Path(x)) for x in vals if x is not None]
    return out


def _identity(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _input_files(label: str, p: Path, depth: int = 0) -> list[tuple[str, Path]]:
    """An input and every file reading it reads too: its manifest, every file the manifest lists, the external data
    an ONNX model references (listed or not), an OpenVINO IR's ``.bin``, and the sidecar artifacts the manifest
    names (its ``decoder``, the ``cache_graphs`` light graph) with their own files."""
    found = [(label, p)]
    if not p.is_file():
        return found
    suffix = p.suffix.lower()
    if suffix == ".xml":
        found.append((f"the weights of {label}", p.with_suffix(".bin")))
    elif suffix == ".onnx":
        found += [(f"the external data of {label}", p.parent / loc) for loc in _onnx_external(p)]
    mp = p.with_name(p.name + ".json")
    if not mp.is_file():
        return found
    found.append((f"{label}'s manifest", mp))
    try:
        m = json.loads(mp.read_text())
    except (OSError, ValueError, RecursionError):
        return found
    if not isinstance(m, dict):
        return found
    listed = m.get("files")
    found += [(f"a file of {label}", p.with_name(n)) for n in (listed if isinstance(listed, dict) else ())
              if _plain_name(n)]
    cg = m.get("cache_graphs")
    sidecars = {"decoder": m.get("decoder"), "light graph": cg.get("light") if isinstance(cg, dict) else None}
    for what, name in sidecars.items():
        if depth == 0 and _plain_name(name):
            found += _input_files(f"{label}'s {what}", p.with_name(name), depth + 1)
    return found


def _plain_name(name: Any) -> bool:
    """A file name beside the artifact (what manifests record), not a path."""
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and "\x00" not in name \
        and name not in (".", "..")


def _onnx_external(p: Path) -> list[str]:
    """The external-data locations an ONNX file references (none when it is not readable as ONNX)."""
    from ditdeploy.artifact.onnx_header import scan
    from ditdeploy.errors import ArtifactError

    try:
        return sorted(loc for loc in scan(p).external if "\x00" not in loc)
    except (ArtifactError, RecursionError, ValueError):
        return []


def _same(a: Path, b: Path, ida: tuple[int, int] | None, idb: tuple[int, int] | None) -> bool:
    return os.path.realpath(a) == os.path.realpath(b) or (ida is not None and ida == idb)


def _lands(p: Path) -> tuple:
    """Where an output's bytes land: the device/FIFO a link points to, else the (possibly symlink) path itself, whose
    folder is resolved; a hard-linked regular file by its inode."""
    f = final_path(p)
    ident = _identity(f) if not f.is_symlink() else None
    return ident or (os.path.join(os.path.realpath(f.parent), f.name),)


def _check_not_input(label: str, out: Path, ins: list[tuple[str, Path, tuple[int, int] | None]]) -> None:
    oid = _identity(out)
    real = os.path.realpath(out)
    for ilabel, ip, iid in ins:
        if _same(out, ip, oid, iid):
            raise DitDeployError(f"{label} {out} is {ilabel} {ip}, an input of this run: writing it would destroy "
                                 "the input; choose another output path")
        if oid is not None and ip.is_dir() and real.startswith(os.path.realpath(ip) + os.sep):
            raise DitDeployError(f"{label} {out} is a file inside {ilabel} {ip}, an input of this run: choose an "
                                 "output path outside it")


def _existing_ancestor(p: Path) -> Path:
    a = Path(os.path.abspath(p)).parent
    while not a.exists() and a != a.parent:
        a = a.parent
    return a


def _check_destination(label: str, out: Path, kind: str, in_set: bool) -> bool:
    """Kind and folder checks of one output; returns whether it is written through."""
    if kind == "directory":
        raise DitDeployError(f"{label} {out} is a directory: give a file name")
    if kind not in ("missing", "regular"):
        if in_set or kind not in WRITE_THROUGH:
            why = "an artifact needs a regular file with its manifest beside it" if in_set else \
                "only regular files, character devices and FIFOs can receive an output"
            raise DitDeployError(f"{label} {out} is a {kind}: {why}; name a regular file (it is never replaced)")
        return True
    anc = _existing_ancestor(final_path(out))
    if not anc.is_dir():
        raise DitDeployError(f"{label} {out}: {anc} is a file, not a directory; choose another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(anc) else "permission denied"
        raise DitDeployError(f"{label} {out}: {anc} is not writable ({why}); choose another path")
    return False


def _read_only(d: Path) -> bool:
    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _check_space(plan: list[Output], expected: Mapping[str, int]) -> None:
    need: dict[int, list[Any]] = {}
    for o in plan:
        n = expected.get(o.label)
        if not n or o.through:
            continue
        anc = _existing_ancestor(o.final)
        dev = os.stat(anc).st_dev
        need.setdefault(dev, [0, anc, []])
        need[dev][0] += n
        need[dev][2].append(o.label)
    for total, anc, labels in need.values():
        free = shutil.disk_usage(anc).free
        if total * SPACE_MARGIN > free:
            raise DitDeployError(f"not enough disk space for {' and '.join(dict.fromkeys(labels))} in {anc}: needs "
                                 f"about {human_bytes(total)}, {human_bytes(free)} free; free space or choose "
                                 "another path")


def check_outputs(inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any],
                  expected_bytes: Mapping[str, int] | int | None = None, *,
                  sets: Mapping[str, Any] | None = None) -> OutputPlan:
    """Apply the output policy (module docstring) before any work; one-line ``DitDeployError`` on a violation.

    ``inputs`` / ``outputs`` / ``sets`` map a flag name (used in messages) to a path, a list of paths, or None.
    ``sets`` are artifact outputs that get a manifest (and by suffix a data file) beside them: all those files count
    as outputs and none may be a device. ``expected_bytes``: per flag (or one number for the only output) the size
    the run will write, checked against the free space of its file system.
    """
    ins = [(lb, p, _identity(p)) for label, p0 in _entries(inputs) for lb, p in _input_files(label, p0)]
    outs = [(lb, p, False) for lb, p in _entries(outputs)]
    for label, p in _entries(sets):
        outs.append((label, p, True))
        outs += [(f"{label}'s {what}", f, True)
                 for what, f in zip(("manifest", "data file"), artifact_files(p)[1:], strict=False)]
    plan: list[Output] = []
    for label, p, in_set in outs:
        through = _check_destination(label, p, file_kind(p), in_set)
        _check_not_input(label, p, ins)
        for o in plan:
            if _lands(p) == _lands(o.path):
                raise DitDeployError(f"{o.label} and {label} name the same file {p}: give each output its own path")
        plan.append(Output(label, p, final_path(p), through))
    if isinstance(expected_bytes, int):
        expected_bytes = {plan[0].label: expected_bytes} if plan else {}
    result = OutputPlan(tuple(plan))
    result.check_space(expected_bytes or {})
    return result


def check_new_folder(label: str, out: str | os.PathLike, inputs: Mapping[str, Any] | None = None) -> None:
    """The policy for an output that is a new folder (a diffusers snapshot), before any work: refused when it is a
    link, a file or device, a non-empty folder, below a file, in a folder that cannot be written, or one of the
    ``inputs`` (or inside one). One line, ``DitDeployError``."""
    out = Path(out)
    if out.is_symlink():
        raise DitDeployError(f"{label} {out} is a symbolic link: name a new folder (a link is never followed or "
                             "replaced)")
    kind = file_kind(out)
    if kind == "directory" and any(out.iterdir()):
        raise DitDeployError(f"{label} {out} already exists and is not empty: choose another path or remove it "
                             "(the output is a new folder)")
    if kind not in ("missing", "directory"):
        raise DitDeployError(f"{label} {out} is a {kind}, not a folder: name a new folder")
    anc = _existing_ancestor(out)
    if not anc.is_dir():
        raise DitDeployError(f"{label} {out}: {anc} is a file, not a directory; choose another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise DitDeployError(f"{label} {out}: {anc} is not writable; choose another path")
    real = os.path.realpath(out)
    for ilabel, ip in _entries(inputs):
        ireal = os.path.realpath(ip)
        if real == ireal or real.startswith(ireal.rstrip(os.sep) + os.sep):
            raise DitDeployError(f"{label} {out} is inside {ilabel} {ip}, an input of this run: choose an output "
                                 "folder outside it")
