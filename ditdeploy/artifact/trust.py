"""Trust for artifacts that carry native code, in the spirit of transformers' ``trust_remote_code``.

Most artifact formats are data: ONNX, OpenVINO IR (.xml/.bin), safetensors and npz are parsed, never executed, and
a tampered one can at worst give wrong numbers or an error. Two are code:

* ``.pt2`` (AOTInductor): a zip holding a compiled shared library that the loader extracts and ``dlopen``s -- its
  constructors run before anything can check it;
* TensorRT engines (``.plan``/``.engine``/``.trt``): deserialized by TensorRT's native code, and may name plugins.

The manifest's sha256 only proves that the files match the manifest beside them, which whoever wrote the files
also writes. So a native artifact loads only when

1. the caller says so: ``trust_native_code=True`` (``--trust-native-code`` on every command that loads artifacts), or
2. the sha256 of its bytes is in the trusted-digests file the user manages: ``$DITDEPLOY_TRUSTED_FILE``, else
   ``$XDG_CONFIG_HOME/ditdeploy/trusted.txt`` (``~/.config/ditdeploy/trusted.txt``). One digest per line, anything
   after it is a note, ``#`` starts a comment. ``ditdeploy export`` appends every native artifact it builds (this
   installation built it); delete a line to revoke it. ``DITDEPLOY_TRUSTED_FILE=`` (empty) turns the file off:
   nothing is recorded and only the flag loads native code.

Otherwise: one-line :class:`UntrustedNativeCode`, before a byte of the artifact reaches native code. Stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ditdeploy.errors import ArtifactError

ENV = "DITDEPLOY_TRUSTED_FILE"
FLAG = "--trust-native-code"
# format -> why it is code (the error line says it)
NATIVE = {
    "aoti": "a .pt2 holds a compiled shared library that runs when it loads",
    "tensorrt": "a TensorRT engine is deserialized by native code and may load plugins",
}
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class UntrustedNativeCode(ArtifactError):
    """A native-code artifact that neither the flag nor the trusted-digests file allows."""


def trusted_file() -> Path | None:
    """The trusted-digests file (it may not exist yet); None when ``DITDEPLOY_TRUSTED_FILE`` is set empty."""
    env = os.environ.get(ENV)
    if env is not None:
        return Path(env).expanduser() if env.strip() else None
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ditdeploy" / "trusted.txt"


def trusted_digests(path: Path | None = None) -> set[str]:
    """The sha256 digests the trusted-digests file lists (malformed lines are ignored; no file: none)."""
    path = trusted_file() if path is None else path
    if path is None:
        return set()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    words = (line.split("#", 1)[0].split() for line in text.splitlines())
    return {w[0].lower() for w in words if w and _DIGEST.match(w[0].lower())}


def record_trusted(digest: str, artifact: str | os.PathLike, fmt: str) -> Path | None:
    """Append ``digest`` (an artifact this installation just built) to the trusted-digests file; returns the file,
    or None when the file is off or cannot be written (then loading it again needs the flag)."""
    path = trusted_file()
    if path is None or not _DIGEST.match(digest):
        return None
    if digest in trusted_digests(path):
        return path
    line = f"{digest}  {fmt} {Path(artifact).name} built {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.write(fd, line.encode())  # one append of one short line: concurrent exports do not interleave
        finally:
            os.close(fd)
        return path
    return None


def artifact_digest(artifact: str | os.PathLike, verified: Mapping[str, Any] | None = None) -> str:
    """sha256 of the artifact's bytes: the entry of ``verified`` (a manifest whose sha256s were just checked against
    the files) when given, else hashed now."""
    files = verified.get("files") if verified is not None else None
    entry = files.get(Path(artifact).name) if isinstance(files, Mapping) else None
    digest = entry.get("sha256") if isinstance(entry, Mapping) else None
    if isinstance(digest, str) and _DIGEST.match(digest):
        return digest
    from ditdeploy.artifact.files import sha256_file

    return sha256_file(artifact)


def require_trusted(artifact: str | os.PathLike, fmt: str, trust_native_code: bool,
                    verified: Mapping[str, Any] | None = None) -> None:
    """Refuse (one line) to hand a native-code artifact to native code unless the flag is given or the
    trusted-digests file lists the sha256 of its bytes (:func:`artifact_digest`; ``verified``: see there)."""
    if fmt not in NATIVE or trust_native_code:
        return
    digest = artifact_digest(artifact, verified)
    if digest in trusted_digests():
        return
    listed = trusted_file()
    where = f"the trusted list ({listed})" if listed is not None else f"a trusted list (off: {ENV} is empty)"
    raise UntrustedNativeCode(
        f"{Path(artifact).name} is native code ({NATIVE[fmt]}) that this installation did not build and "
        f"{where} does not name (sha256 {digest[:12]}…): load it only if you trust its source, with {FLAG}")
