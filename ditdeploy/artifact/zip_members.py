"""Zip-like artifacts (``.pt2``) checked before anything extracts them, and the private folder they extract into.

:func:`check_zip` reads the central directory and every local header (stdlib ``zipfile``) and refuses, in one line:
absolute members and members with a ``..`` component (an extractor would write outside its folder: torch's AOTI
loader does), links and other non-regular entries, encrypted members, duplicate names, names whose local header
disagrees with the directory, more than :data:`MAX_MEMBERS` members, and uncompressed sizes beyond
:data:`MAX_MEMBER_BYTES` per member or :data:`MAX_TOTAL_BYTES` / :data:`MAX_RATIO` x the archive in all (a zip bomb).

:class:`PrivateDir` is a fresh mode-0700 folder, tagged with this process's pid (``ditdeploy.artifact.files``'s
temp naming, so a later run removes it if this one is killed), that ``TMPDIR`` points to while a native loader
unpacks there (:class:`PrivateDir`); the caller removes it on every path, failure included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import weakref
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ditdeploy.errors import ArtifactError

MAX_MEMBERS = 20_000  # a CUDA .pt2 holds one cubin per kernel: hundreds; far below this
MAX_MEMBER_BYTES = 64 * 2**30
MAX_TOTAL_BYTES = 128 * 2**30
MAX_RATIO = 200  # uncompressed / archive bytes (AOTInductor stores members uncompressed: ~1)


def _bad(path: Path, what: str, why: str) -> ArtifactError:
    return ArtifactError(f"cannot load {what} {path.name}: {why}; refusing to extract it (the file is truncated, "
                         "tampered with or corrupt)")


def _unsafe_name(name: str) -> str | None:
    """Why member ``name`` could land outside the extraction folder; None when it cannot."""
    if not name or "\0" in name:
        return "an empty or NUL-containing member name"
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return f"an absolute member name {name[:80]!r}"
    if ".." in parts:
        return f"a member name with '..' {name[:80]!r}"
    return None


def check_zip(path: str | os.PathLike, what: str = "the archive") -> list[zipfile.ZipInfo]:
    """The members of the zip at ``path`` after the checks above; ArtifactError (one line, naming ``what``) on the
    first failure."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise _bad(path, what, f"not a readable zip ({type(e).__name__}: {str(e)[:120]})") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise _bad(path, what, f"{len(infos)} members (at most {MAX_MEMBERS})")
        seen: set[str] = set()
        total = 0
        for info in infos:
            why = _unsafe_name(info.filename)
            if why:
                raise _bad(path, what, why)
            key = info.filename.replace("\\", "/").rstrip("/")
            if key in seen:
                raise _bad(path, what, f"the member {info.filename[:80]!r} twice")
            seen.add(key)
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFLNK:
                raise _bad(path, what, f"a link member {info.filename[:80]!r}")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _bad(path, what, f"a special-file member {info.filename[:80]!r}")
            if info.flag_bits & 0x1:
                raise _bad(path, what, f"an encrypted member {info.filename[:80]!r}")
            if info.file_size > MAX_MEMBER_BYTES:
                raise _bad(path, what, f"a member of {info.file_size} bytes (at most {MAX_MEMBER_BYTES})")
            total += info.file_size
        size = path.stat().st_size
        if total > MAX_TOTAL_BYTES or total > MAX_RATIO * max(size, 1):
            raise _bad(path, what, f"{total} bytes uncompressed from a {size}-byte archive")
        for info in infos:  # the local headers: each must name the member the directory names
            try:
                zf.open(info).close()
            except (zipfile.BadZipFile, NotImplementedError, OSError, ValueError) as e:
                raise _bad(path, what, f"member {info.filename[:80]!r} is inconsistent ({str(e)[:120]})") from e
    return infos


class PrivateDir:
    """A private temporary folder; removed by :meth:`remove`, at garbage collection or at exit, whichever first."""

    def __init__(self, kind: str):
        from ditdeploy.artifact.files import clean_stale_temps, temp_prefix

        base = tempfile.gettempdir()
        clean_stale_temps(base)  # what killed runs left behind
        self.path = Path(tempfile.mkdtemp(prefix=temp_prefix(kind=kind), dir=base))  # mode 0700
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def remove(self) -> None:
        self._finalizer()

    @contextlib.contextmanager
    def as_tmpdir(self) -> Iterator[Path]:
        """``TMPDIR`` points here for the block (native loaders that unpack into the temp folder use it)."""
        old = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(self.path)
        try:
            yield self.path
        finally:
            if old is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = old

