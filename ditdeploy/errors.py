"""User-facing errors: the CLI prints ``str(err)`` as one line and exits non-zero (no traceback)."""

from __future__ import annotations


class DitDeployError(Exception):
    """An error caused by the user's input or environment, with a message that names the problem and the fix."""

    exit_code = 2


class MissingDependencyError(DitDeployError):
    """An optional runtime/extra is not installed."""

    def __init__(self, module: str, extra: str, what: str = ""):
        what = what or module
        super().__init__(f"{what} needs the '{module}' package: pip install 'ditdeploy[{extra}]'")


class ArtifactError(DitDeployError):
    """A file (checkpoint, ONNX, engine, calibration set, manifest) is missing, corrupt or inconsistent."""


class NumericsError(DitDeployError):
    """NaN/Inf or a failed parity check."""

    exit_code = 1


def require(module: str, extra: str, what: str = ""):
    """Import an optional module or raise a one-line MissingDependencyError naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on environment
        raise MissingDependencyError(module.split(".")[0], extra, what) from e
