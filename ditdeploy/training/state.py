"""Training checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint is ``{model, ema, opt, scaler, args, config, step, rng, data, log}`` (plain dicts, numbers,
strings and tensors only).

Files are ``<out>/checkpoints/<step:07d>.pt``. A new checkpoint is written to a temporary file in the same
folder and renamed into place; only then are older ones pruned to the last ``keep``. A SIGKILL at any moment
therefore leaves the previous checkpoints intact and never a partial file under a final name (a stray
``.*.tmp`` may remain; it is removed at the next start). A failed write (disk full, file-size limit) raises a
one-line error and likewise leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditdeploy.artifact.files import atomic_path
from ditdeploy.errors import ArtifactError, DitDeployError

CKPT_RE = re.compile(r"^(\d{7,})\.pt$")
TEMP_RE = re.compile(r"^\.\d{7,}\.pt\..+\.tmp$")  # atomic_path's temporary name for a checkpoint
REQUIRED_KEYS = ("model", "ema", "opt", "args", "config", "step", "rng", "data")
FORMAT = "ditdeploy-train-v1"


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"{step:07d}.pt"


def list_checkpoints(ckdir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the final-named checkpoints in ``ckdir``, oldest first."""
    d = Path(ckdir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def remove_stale_temps(ckdir: str | Path) -> int:
    """Delete temporary files left by a killed checkpoint write (``.NNNNNNN.pt.*.tmp``); returns how many."""
    d = Path(ckdir)
    n = 0
    if d.is_dir():
        for p in d.iterdir():
            if TEMP_RE.match(p.name):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    n += 1
    return n


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors / plain data (weights_only-loadable)."""
    np_state = np.random.get_state()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    npst = st["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    random.setstate((3, tuple(st["python"][0]), st["python"][1]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` (plus a format tag) to ``path``; one-line DitDeployError on any write failure."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save({"format": FORMAT, **payload}, tmp)
    except DitDeployError as e:
        raise DitDeployError(f"{e}; the previous checkpoint is intact") from e
    except (RuntimeError, OSError) as e:  # torch's zip writer reports ENOSPC/EFBIG as RuntimeError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DitDeployError(f"could not write checkpoint {path} ({reason}): is the disk full? "
                             "The previous checkpoint is intact") from e
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint safely (weights_only) and check it has every entry resume needs."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} does not exist: pass a checkpoint file or a training --out folder")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage, refused pickle: all one line
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ArtifactError(f"checkpoint {path} is corrupt or not a ditdeploy training checkpoint ({reason}): "
                            "resume from an older one in the same folder") from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT or any(k not in ck for k in REQUIRED_KEYS):
        raise ArtifactError(f"{path} is not a ditdeploy training checkpoint (missing entries): "
                            "--resume needs a file written by `ditdeploy train`")
    return ck


def resolve_resume(path: str | Path) -> Path:
    """A checkpoint file, or a run folder / its checkpoints folder -> its newest checkpoint."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for d in (checkpoint_dir(p), p):
            found = list_checkpoints(d)
            if found:
                return found[-1][1]
        raise DitDeployError(f"--resume {p}: no checkpoints found (expected {checkpoint_dir(p)}/NNNNNNN.pt)")
    raise DitDeployError(f"--resume {p} does not exist: pass a checkpoint file or a training --out folder")


def prune(ckdir: str | Path, keep: int) -> None:
    """Keep only the newest ``keep`` checkpoints."""
    found = list_checkpoints(ckdir)
    for _, p in found[: max(0, len(found) - keep)]:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
