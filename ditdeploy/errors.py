"""User-facing errors: the CLI prints ``str(err)`` as one line and exits non-zero (no traceback)."""

from __future__ import annotations


class DitDeployError(Exception):
    """An error caused by the user's input or environment, with a message that names the problem and the fix."""

    exit_code = 2


class MissingDependencyError(DitDeployError):
    """An optional runtime/extra is not installed."""

    def __init__(self, module: str, extra: str, what: str = ""):
        raise_if_interrupted(self)
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
        raise_if_interrupted(e)
        raise MissingDependencyError(module.split(".")[0], extra, what) from e


def raise_if_interrupted(e: BaseException) -> None:
    """Re-raise the interruption an ``ImportError`` (or other error) stands for: a C extension's import that is
    interrupted reports ``ImportError``, which must not read as a missing package."""
    from ditdeploy.system.interrupts import Terminated, received

    sig = received()
    if sig is None:
        return
    import signal

    if sig == signal.SIGINT:
        raise KeyboardInterrupt from e
    raise Terminated(sig) from e
