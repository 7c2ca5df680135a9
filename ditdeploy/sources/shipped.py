"""The assets shipped inside the package: the default ``digits`` model (weights and its ONNX export).

The one place that knows where they live; the CLI's defaults, ``check``/``bench``'s reference fallback, ``export
--model digits`` and the bench scripts all ask here. Stdlib only.
"""

from __future__ import annotations

from pathlib import Path

from ditdeploy.errors import ArtifactError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DIGITS_CHECKPOINT = ASSETS / "digits.safetensors"  # trained by `ditdeploy train --preset digits`
DIGITS_ONNX = ASSETS / "digits.onnx"  # its fp32 ONNX export (manifest digits.onnx.json beside it)
DIGITS_VARIANT = "digits"


def digits_checkpoint() -> Path | None:
    """The shipped digits checkpoint, or None when it is not installed."""
    return DIGITS_CHECKPOINT if DIGITS_CHECKPOINT.is_file() else None


def default_model(backend: str | None = None) -> Path:
    """The shipped default model for ``backend``: digits.onnx (digits.safetensors for the torch backend).

    ArtifactError (one line) when the file is missing from this installation.
    """
    torch = bool(backend) and str(backend).lower() in ("torch", "pytorch")
    p = DIGITS_CHECKPOINT if torch else DIGITS_ONNX
    if not p.is_file():
        raise ArtifactError(f"the shipped default model {p} is missing: reinstall ditdeploy or pass --engine FILE")
    return p


def require_digits_checkpoint() -> Path:
    """The shipped digits checkpoint; ArtifactError naming how to get it when missing."""
    if not DIGITS_CHECKPOINT.is_file():
        raise ArtifactError(f"the shipped digits model {DIGITS_CHECKPOINT} is missing: train it with "
                            "`ditdeploy train --preset digits` or reinstall ditdeploy")
    return DIGITS_CHECKPOINT
