"""The official DiT weights: where they live, where they are cached, and a verified download.

The released files (facebookresearch/DiT ``download.py``) are bare EMA state dicts of DiT-XL/2::

    https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt
    https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt

They are licensed CC-BY-NC 4.0: ditdeploy never ships or commits them; users fetch them themselves.

Checksums: no sha256 of these files is published by the authors, and none could be found in public sources, so
none is hard-coded here (an invented one would be worse than none). Verification is therefore
*trust-on-first-use*: the first successful download (or the first time a manually placed file is found in the
cache) records its sha256 in ``<cache>/<name>.sha256``; every later use verifies the file against that record. Pass
``expected_sha256`` to pin a known value instead. This module imports only the standard library and tqdm.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditdeploy.artifact.files import atomic_path, sha256_file, write_bytes_atomic
from ditdeploy.errors import ArtifactError, DitDeployError

__all__ = [
    "OFFICIAL_BASE_URL",
    "OFFICIAL_WEIGHTS",
    "OfficialWeights",
    "cached_official",
    "fetch_official",
    "official_name",
    "official_path_hint",
    "resolve_cache_dir",
    "resolve_checkpoint",
]

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/DiT/models"
LICENSE = "CC-BY-NC 4.0"
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class OfficialWeights:
    """One released checkpoint: file name, the variant and image size it is for, and its sha256 if known."""

    name: str
    variant: str
    image_size: int
    sha256: str | None = None  # not published upstream: see the module docstring (trust-on-first-use)

    @property
    def url(self) -> str:
        return f"{OFFICIAL_BASE_URL}/{self.name}"


OFFICIAL_WEIGHTS: dict[str, OfficialWeights] = {
    w.name: w
    for w in (
        OfficialWeights("DiT-XL-2-256x256.pt", "XL/2", 256),
        OfficialWeights("DiT-XL-2-512x512.pt", "XL/2", 512),
    )
}


def _entry(name: str) -> OfficialWeights:
    key = name if name.endswith(".pt") else name + ".pt"
    if key not in OFFICIAL_WEIGHTS:
        raise DitDeployError(f"unknown official weights {name!r}: choose one of {', '.join(OFFICIAL_WEIGHTS)}")
    return OFFICIAL_WEIGHTS[key]


def official_name(variant: str, image_size: int = 256) -> str | None:
    """File name of the released weights for ``variant`` at ``image_size`` ("XL/2", 256 -> "DiT-XL-2-256x256.pt")."""
    key = variant.upper().replace("DIT-", "")
    for w in OFFICIAL_WEIGHTS.values():
        if w.variant == key and w.image_size == image_size:
            return w.name
    return None


def resolve_cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Weights cache: ``override``, else ``$DITDEPLOY_CACHE``, else ``~/.cache/ditdeploy``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("DITDEPLOY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ditdeploy"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_sidecar(path: Path) -> str | None:
    sc = _sidecar(path)
    if not sc.exists():
        return None
    m = re.match(r"\s*([0-9a-fA-F]{64})\b", sc.read_text())
    if not m:
        raise ArtifactError(f"{sc} is not a sha256 record: delete it (and {path.name} if in doubt) and fetch again")
    return m.group(1).lower()


def official_path_hint(name: str, cache: str | os.PathLike | None = None) -> str:
    """One sentence telling an offline user where to put the official file by hand."""
    w = _entry(name)
    dest = resolve_cache_dir(cache) / w.name
    return (
        f"download {w.url} ({LICENSE}) on a machine with network access and put it at {dest} "
        f"(or set DITDEPLOY_CACHE, or pass --checkpoint /path/to/{w.name})"
    )


def cached_official(name: str, cache: str | os.PathLike | None = None) -> Path | None:
    """Path of the official file in the cache if it is there (not verified), else None; never downloads."""
    p = resolve_cache_dir(cache) / _entry(name).name
    return p if p.is_file() else None


def _verify(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise ArtifactError(
            f"{path} does not match {what} (expected sha256 {expected[:12]}…, file {got[:12]}…): "
            f"it is corrupt or a different file; delete it and fetch again"
        )


def fetch_official(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    expected_sha256: str | None = None,
    progress: bool = True,
    timeout: float = _TIMEOUT_S,
) -> Path:
    """Return the path of the official weights ``name``, downloading them into the cache if needed.

    ``base_url`` (default ``$DITDEPLOY_WEIGHTS_URL`` or the official host) lets a mirror stand in. The file is
    streamed to a temporary file in the cache directory with a tqdm bar, its sha256 computed on the way, checked
    against ``expected_sha256`` (or the trust-on-first-use record ``<name>.sha256``), and only then renamed into
    place; on any failure (HTTP error, no network, short transfer, checksum mismatch) nothing is left in the cache
    and a one-line ``ArtifactError`` says what happened and where to put the file by hand.
    """
    w = _entry(name)
    cache = resolve_cache_dir(cache_dir)
    final = cache / w.name
    expected = (expected_sha256 or w.sha256 or "").lower() or None
    if expected is not None and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise DitDeployError(f"expected sha256 {expected_sha256!r} is not 64 hex digits")
    if final.is_file():
        recorded = _read_sidecar(final)
        want = expected or recorded
        if want:
            _verify(final, want, "the pinned sha256" if expected else f"its recorded sha256 ({_sidecar(final).name})")
        else:  # placed by hand, first sight: trust it and record it
            write_bytes_atomic(_sidecar(final), f"{sha256_file(final)}  {w.name}\n".encode())
        return final

    base = (base_url or os.environ.get("DITDEPLOY_WEIGHTS_URL") or OFFICIAL_BASE_URL).rstrip("/")
    url = f"{base}/{w.name}"
    hint = official_path_hint(w.name, cache)
    digest = hashlib.sha256()
    with atomic_path(final, suffix=".part") as tmp:  # the temp file is removed on any error below
        try:
            _download(url, tmp, digest, progress, timeout, w.name)
        except urllib.error.HTTPError as e:
            raise ArtifactError(f"download of {w.name} from {url} failed: HTTP {e.code} {e.reason}; {hint}") from e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", None) or e
            raise ArtifactError(f"cannot download {w.name} from {url} ({reason}); {hint}") from e
        except http.client.HTTPException as e:
            raise ArtifactError(f"download of {w.name} from {url} broke off ({type(e).__name__}); {hint}") from e
        got = digest.hexdigest()
        if expected and got != expected:
            raise ArtifactError(
                f"downloaded {w.name} from {url} has sha256 {got[:12]}…, expected {expected[:12]}…: "
                "the download is corrupt or the server sent a different file; nothing was kept"
            )
    write_bytes_atomic(_sidecar(final), f"{digest.hexdigest()}  {w.name}\n".encode())  # record for later checks
    return final


def _download(url: str, dest: Path, digest: Any, progress: bool, timeout: float, label: str) -> None:
    from tqdm import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "ditdeploy"})
    with urllib.request.urlopen(req, timeout=timeout) as resp, open(dest, "wb") as out:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        got = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=not progress,
                  leave=False) as bar:
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    if total is not None and got != total:
        raise ArtifactError(f"download of {label} from {url} broke off after {got} of {total} bytes: try again")



def resolve_checkpoint(
    spec: str | os.PathLike,
    *,
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    progress: bool = True,
) -> Path:
    """Turn a ``--checkpoint`` argument into an existing file.

    An existing path is returned as is. Otherwise, if its file name is an official one ("DiT-XL-2-256x256.pt",
    with or without ".pt"), the cached copy is used, or (``download=True``) fetched with ``fetch_official``. Anything
    else, or an official file that is absent while ``download=False``, raises a one-line ``ArtifactError`` that says
    where to put the file.
    """
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    name = p.name if p.name.endswith(".pt") else p.name + ".pt"
    if name not in OFFICIAL_WEIGHTS:
        raise ArtifactError(f"checkpoint {p} does not exist: check the path")
    if not download:
        cached = cached_official(name, cache_dir)
        if cached is not None:
            return fetch_official(name, cache_dir=cache_dir, progress=progress)  # verifies the sha256 record
        raise ArtifactError(f"official weights {name} are not here; {official_path_hint(name, cache_dir)}")
    return fetch_official(name, cache_dir=cache_dir, base_url=base_url, progress=progress)
