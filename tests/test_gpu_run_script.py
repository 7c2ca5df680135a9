"""experiments/gpu_run.sh on a CPU, from a clean copy of the checkout (issue #21 defect 2 and acceptance): `dry-run`
and `tiny` with ditdeploy not installed (the mapped copy: run from the repository root, the source folder ditdeploy/
has no export/, runtimes/, bench/), installed from the copy, and with the install failing; a failing python step
makes the script exit non-zero. Each run writes under its own OUT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]


def _checkout(tmp_path: Path) -> Path:
    """The checkout's files as git sees them (tracked + untracked not ignored): no build outputs, no egg-info."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    dest = tmp_path / "checkout"
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def _python_bin(tmp_path: Path, python: str) -> Path:
    """A folder whose `python3` runs ``python`` (the script calls python3)."""
    d = tmp_path / "pybin"
    d.mkdir(exist_ok=True)
    (d / "python3").write_text(f'#!/bin/sh\nexec "{python}" "$@"\n')
    (d / "python3").chmod(0o755)
    return d


def _base_python() -> str:
    """The interpreter below any virtualenv: torch is there, this checkout's copy is not installed in it."""
    exe = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return str(exe if exe.exists() else sys.executable)


def _run(checkout: Path, mode: str, out: Path, pybin: Path, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    e.update(PATH=f"{pybin}{os.pathsep}{e.get('PATH', '')}", OUT=str(out), DITDEPLOY_NO_PROGRESS="1", **env)
    return subprocess.run(["bash", "experiments/gpu_run.sh", mode], cwd=checkout, env=e, capture_output=True,
                          text=True, timeout=600)


def _plan(out: Path) -> dict:
    return json.loads((out / "gpu" / "gpu_engines.json").read_text())


def test_dry_run_not_installed(tmp_path):
    co = _checkout(tmp_path)
    r = _run(co, "dry-run", tmp_path / "out", _python_bin(tmp_path, _base_python()), INSTALL="0")
    assert r.returncode == 0, r.stdout + r.stderr
    st = _plan(tmp_path / "out")["settings"]
    assert st["aoti_module"] and st["fp8_module"]  # ditdeploy.export.* resolved: the mapping, not the source folder
    install = (tmp_path / "out" / "install.txt").read_text()
    assert "using the mapped copy" in install and "torch APIs of the .pt2/CUDA-graph/FP8/GPU-bench code present" in install
    assert "gpu_engines exit 0" in (tmp_path / "out" / "gpu_engines.log").read_text()
    shim = Path(install.split("using the mapped copy ")[1].split()[0])
    assert shim.name.startswith("ditdeploy_gpu_run.") and not shim.exists()  # the copy is removed at exit


def test_failing_python_step_fails_the_script(tmp_path):
    co = _checkout(tmp_path)
    out = tmp_path / "out"
    (out / "gpu" / "gpu_engines.json").mkdir(parents=True)  # the result path is a folder: the step cannot write it
    r = _run(co, "dry-run", out, _python_bin(tmp_path, _base_python()), INSTALL="0")
    assert r.returncode == 1, r.stdout + r.stderr
    log = (out / "gpu_engines.log").read_text()
    assert "gpu_engines exit 1" in log


def test_first_without_a_gpu_fails_in_one_line(tmp_path):
    """`first` wires --plan first and a budget that ends the whole script within FIRST_S; without CUDA the engines
    step says so and the script exits 1, having written the plan and the machine-independent facts."""
    r = _run(REPO, "first", tmp_path / "out", _python_bin(tmp_path, _base_python()), INSTALL="0")
    assert r.returncode == 1, r.stdout + r.stderr
    log = (tmp_path / "out" / "gpu_engines.log").read_text()
    assert "no CUDA device here" in log and "gpu_engines exit 1" in log
    d = _plan(tmp_path / "out")
    assert d["settings"]["plan"] == "first" and 200 < d["settings"]["budget_s"] <= 270


def test_unknown_mode_is_a_usage_error(tmp_path):
    r = _run(REPO, "enignes", tmp_path / "out", _python_bin(tmp_path, _base_python()), INSTALL="0")
    assert r.returncode == 2 and "usage:" in r.stderr


def _venv(tmp_path: Path, own_pip: bool) -> str:
    """A scratch venv over the base interpreter (torch visible). ``own_pip``: the venv's bundled pip and setuptools
    and no ``wheel`` -- the issue's failing install ("invalid command 'bdist_wheel'" with an old setuptools);
    otherwise the base interpreter's pip and setuptools install into it."""
    cmd = [_base_python(), "-m", "venv", "--system-site-packages", str(tmp_path / "venv")]
    subprocess.run(cmd + ([] if own_pip else ["--without-pip"]), check=True)
    return str(tmp_path / "venv" / "bin" / "python")


@pytest.mark.slow
@pytest.mark.parametrize("pip_fails", [False, True])
def test_dry_run_and_tiny_installed_or_install_failing(tmp_path, pip_fails):
    """Installed by the script itself (`pip install -e .` into a scratch venv) or with pip failing (the venv's own
    old setuptools without `wheel`, and a constraints file that does not exist so it fails whatever the versions):
    both modes pass; only the failing install uses the mapped copy."""
    co = _checkout(tmp_path)
    pybin = _python_bin(tmp_path, _venv(tmp_path, own_pip=pip_fails))
    env = {"PIP_CONSTRAINT": str(tmp_path / "missing.txt")} if pip_fails else {}
    for mode in ("dry-run", "tiny"):
        out = tmp_path / f"out-{mode}"
        r = _run(co, mode, out, pybin, **env)
        assert r.returncode == 0, r.stdout + r.stderr + (out / "install.txt").read_text()
        install = (out / "install.txt").read_text()
        assert ("using the mapped copy" in install) is pip_fails, install
        assert _plan(out)["settings"]["aoti_module"]
    d = _plan(tmp_path / "out-tiny")
    assert not d["errors"] and d["rows"]["eager_bf16/b2"]["parity_vs_fp32_eager"]["cosine"] > 0.999


@pytest.mark.slow
def test_tiny_not_installed(tmp_path):
    co = _checkout(tmp_path)
    r = _run(co, "tiny", tmp_path / "out", _python_bin(tmp_path, _base_python()), INSTALL="0")
    assert r.returncode == 0, r.stdout + r.stderr
    d = _plan(tmp_path / "out")
    assert not d["errors"] and d["rows"]["eager_fp16/b2"]["parity_vs_fp32_eager"]["cosine"] > 0.999
