"""The server's environment (ditdeploy/serving/env.py): README's install line creates it, CI runs that line, the
server process finds it, and tritonserver's Python-backend stub gets this interpreter's libpython first."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from ditdeploy.serving import env

ROOT = Path(__file__).resolve().parents[1]


def _install_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("python3 -m pip install torch")]
    assert len(lines) == 1, lines
    return lines[0]


def test_readme_and_ci_install_line_create_the_server_env():
    readme = _install_line((ROOT / "README.md").read_text())
    ci = _install_line((ROOT / ".ci" / "run").read_text())
    assert readme == ci
    assert readme.endswith(" && " + env.INSTALL_COMMAND)
    assert "/" + env.SERVE_ENV_DIR + "/" in (ROOT / ".gitignore").read_text()


def test_serve_extra_pins_what_pytriton_needs():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "numpy<2" in extras["serve"] and any(r.startswith("nvidia-pytriton==") for r in extras["serve"])
    # never in dev: dev keeps numpy 2 (the pinned outputs are made there)
    assert not any("pytriton" in r for r in extras["dev"])


def test_libpython_first_puts_this_interpreters_libdir_first_once():
    libdir = sysconfig.get_config_var("LIBDIR")
    got = env.libpython_first({"LD_LIBRARY_PATH": f"/opt/x:{libdir}:/opt/y", "A": "1"})
    assert got["LD_LIBRARY_PATH"].split(os.pathsep) == [libdir, "/opt/x", "/opt/y"]
    assert got["A"] == "1"
    assert env.libpython_first({})["LD_LIBRARY_PATH"] == libdir


def test_server_python_env_var_must_be_an_executable(tmp_path, monkeypatch):
    monkeypatch.setenv(env.PYTHON_ENV_VAR, str(tmp_path / "nope"))
    with pytest.raises(env.ServeEnvError, match="is not an executable file"):
        env.server_python()
    monkeypatch.setenv(env.PYTHON_ENV_VAR, sys.executable)
    assert env.server_python() == Path(sys.executable)


def test_server_python_is_found_and_has_pytriton_and_numpy1(monkeypatch):
    monkeypatch.delenv(env.PYTHON_ENV_VAR, raising=False)
    python = env.server_python()
    out = subprocess.run(
        [str(python), "-c", "import numpy, pytriton.triton, ditdeploy.serving.env as e; "
                            "print(numpy.__version__.split('.')[0], e.pytriton_usable_here())"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "True"]
