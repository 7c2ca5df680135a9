"""Where the server's Python environment is, and the process environment tritonserver needs.

PyPI's ``nvidia-pytriton`` 0.7.0 bundles a real tritonserver (2.51, Python backend only) but pins ``numpy<2``, and
this project's environment has numpy 2. So README's install line makes a second environment, ``.venv-serve`` in the
checkout, with the system site packages (torch, onnxruntime, openvino: they import under numpy 1.26 too) and this
project with its ``serve`` extra (``nvidia-pytriton``, ``numpy<2``). ``ditdeploy serve`` runs the server process with that
environment's Python unless the current one has PyTriton itself. Stdlib only (the client never imports this path's
heavy parts).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

from ditdeploy.errors import DitDeployError

SERVE_ENV_DIR = ".venv-serve"
PYTHON_ENV_VAR = "DITDEPLOY_SERVE_PYTHON"
# README's install line ends with this (tests/test_serving_env.py checks README and .ci/run say it)
INSTALL_COMMAND = (
    f"python3 -m venv --system-site-packages {SERVE_ENV_DIR} && {SERVE_ENV_DIR}/bin/python -m pip install -e '.[serve]'"
)


class ServeEnvError(DitDeployError):
    """No Python environment with PyTriton was found."""


def checkout_dir() -> Path:
    """The folder holding the ``ditdeploy`` package (the checkout, for an editable install)."""
    import ditdeploy

    return Path(ditdeploy.__file__).resolve().parent.parent


def pytriton_usable_here() -> bool:
    """True when this interpreter has PyTriton and a numpy it accepts (< 2)."""
    if importlib.util.find_spec("pytriton") is None:
        return False
    try:
        return int(importlib.metadata.version("numpy").split(".")[0]) < 2
    except importlib.metadata.PackageNotFoundError:
        return False


def server_python() -> Path:
    """The interpreter that runs the server: ``$DITDEPLOY_SERVE_PYTHON``, else this one when it has PyTriton, else
    ``.venv-serve/bin/python`` in the checkout. A one-line error with the install command when there is none."""
    chosen = os.environ.get(PYTHON_ENV_VAR)
    if chosen:
        path = Path(chosen)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ServeEnvError(f"${PYTHON_ENV_VAR}={chosen} is not an executable file")
        return path
    if pytriton_usable_here():
        return Path(sys.executable)
    env_dir = checkout_dir() / SERVE_ENV_DIR
    candidate = env_dir / "bin" / "python"
    if candidate.is_file():
        return candidate
    raise ServeEnvError(
        f"the server needs PyTriton (numpy<2) in its own environment; none at {env_dir}: "
        f"create it from the checkout with: {INSTALL_COMMAND}"
    )


def libpython_first(environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) with this interpreter's LIBDIR first on ``LD_LIBRARY_PATH``.

    The Python-backend stub bundled with PyTriton links ``libpython3.11.so.1.0`` without an RPATH: under a Python that
    is not the system one it would load the system libpython against another standard library (``RLock`` has no
    ``_recursion_count``). tritonserver and its stubs inherit the variable, so set it before the server starts."""
    env = dict(os.environ if environ is None else environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *parts] if libdir else parts)
    return env


def server_command(python: Path, args: list[str]) -> list[str]:
    """The argv that starts the server process (``ditdeploy.serving.server``) under ``python``."""
    return [str(python), "-m", "ditdeploy.serving.server", *args]
