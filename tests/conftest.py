"""Shared fixtures: small real artifacts built once per test session with the project's own exporters, and a runner
for the real CLI entry point (``ditdeploy.cli.main``) in-process.

Tests must never modify the session artifacts in place: copy them (``copy_artifact``) and damage the copy.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_trusted_list(tmp_path_factory) -> Path:
    """The trusted-digests file of native artifacts (``ditdeploy.artifact.trust``) for this session: a private one, never the
    user's ~/.config/ditdeploy/trusted.txt (exports record what they build there; loads consult it)."""
    old = os.environ.get("DITDEPLOY_TRUSTED_FILE")
    path = tmp_path_factory.mktemp("trust") / "trusted.txt"
    os.environ["DITDEPLOY_TRUSTED_FILE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DITDEPLOY_TRUSTED_FILE", None)
    else:
        os.environ["DITDEPLOY_TRUSTED_FILE"] = old


@pytest.fixture(scope="session")
def digits_artifacts(tmp_path_factory) -> dict[str, Path]:
    """A digits-config DiT (pixel space 1x8x8, 10 classes) with deterministic random weights: ``ckpt``
    (.safetensors with its config in the metadata) and ``onnx`` (fp32, verified on ONNX Runtime at export, manifest
    beside it). Built once per session (~10-30 s of dynamo export)."""
    from ditdeploy.config.variants import DIGITS
    from ditdeploy.export.onnx import export_denoiser_onnx
    from ditdeploy.export.randomize import random_model
    from ditdeploy.sources.checkpoints import save_safetensors

    d = tmp_path_factory.mktemp("digits_artifacts")
    model = random_model(DIGITS, seed=11)
    ckpt = save_safetensors(model, d / "digits-rand.safetensors", DIGITS)
    onnx_path = d / "digits-rand.onnx"
    export_denoiser_onnx(model, onnx_path, precision="fp32")
    return {"dir": d, "ckpt": ckpt, "onnx": onnx_path}


# --------------------------------------------------------------------------------------------------------- helpers
def copy_artifact(src: Path, dest_dir: Path, name: str | None = None, manifest: bool = True) -> Path:
    """Copy an artifact (and, by default, its ``.json`` manifest) into ``dest_dir`` (created); returns the copy."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dst = dest_dir / (name or src.name)
    shutil.copyfile(src, dst)
    if manifest:
        shutil.copyfile(src.with_name(src.name + ".json"), dst.with_name(dst.name + ".json"))
        if dst.name != src.name:
            m = json.loads(dst.with_name(dst.name + ".json").read_text())
            m["files"] = {(dst.name if k == src.name else k): v for k, v in m["files"].items()}
            m["artifact"] = dst.name
            dst.with_name(dst.name + ".json").write_text(json.dumps(m))
    return dst


def edit_manifest(artifact: Path, fn: Callable[[dict], None]) -> None:
    """Load the manifest beside ``artifact``, let ``fn`` change it in place, write it back."""
    mp = artifact.with_name(artifact.name + ".json")
    m = json.loads(mp.read_text())
    fn(m)
    mp.write_text(json.dumps(m))


def rehash(artifact: Path, files: Iterable[Path] | None = None) -> None:
    """Re-record the sha256/size of ``files`` (default: the artifact alone) in its manifest, so a deliberately
    damaged file passes the hash check and reaches the runtime's own loader."""
    from ditdeploy.artifact.files import sha256_file

    files = list(files) if files is not None else [artifact]

    def fn(m: dict) -> None:
        m["files"] = {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size} for f in files}

    edit_manifest(artifact, fn)


def run_main(args: list[str]) -> tuple[int, str, str]:
    """Run ``ditdeploy.cli.main(args)`` in this process; returns (exit code, stdout, stderr)."""
    import os

    from ditdeploy.cli import main

    os.environ.pop("DITDEPLOY_DEBUG", None)  # `--debug` in an earlier in-process call would leak through env
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def error_lines(stderr: str) -> list[str]:
    """Non-empty stderr lines, with tqdm's carriage-return redraws reduced to their last state."""
    return [ln.split("\r")[-1].strip() for ln in stderr.splitlines() if ln.split("\r")[-1].strip()]


def assert_one_line_error(code: int, stderr: str, keywords: str | Iterable[str], *, strict: bool = True) -> str:
    """The contract of a failed command: exit code != 0, exactly one ``error:`` line that names the problem (each
    keyword, case-insensitive), no traceback. ``strict``: that line is all of stderr (else: the last line, after
    progress/info lines). Returns the error line."""
    assert code not in (0, None), f"expected a failure, got exit code {code}; stderr: {stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = error_lines(stderr)
    errs = [ln for ln in lines if ln.startswith("error:")]
    assert len(errs) == 1, f"expected one 'error:' line, got {len(errs)}: {stderr[-2000:]}"
    if strict:
        assert lines == errs, f"stderr is more than the error line: {stderr[-2000:]}"
    else:
        assert lines[-1] == errs[0], f"the error line is not the last line: {stderr[-2000:]}"
    line = errs[0]
    for kw in [keywords] if isinstance(keywords, str) else keywords:
        assert kw.lower() in line.lower(), f"{kw!r} not named in: {line}"
    return line


ASSETS = Path(__file__).resolve().parent.parent / "ditdeploy" / "assets"

# Runs the CLI (argv[2:]) and SIGKILLs itself at the instant before the rename that publishes argv[1].
KILL_BEFORE_RENAME = """
import os, signal, sys
target = os.path.abspath(sys.argv[1])
_replace = os.replace
def _replace_or_die(src, dst, *a, **k):
    if os.path.abspath(dst) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *a, **k)
os.replace = _replace_or_die
from ditdeploy.cli import main
main(sys.argv[2:])
"""


def cmdline_of(proc) -> list[str]:
    """A psutil process's argv, or [] when it ended (or hid) between listing and reading: short-lived helpers come
    and go while a test polls a process tree."""
    import psutil

    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def shipped_digits_copy(dest: Path) -> Path:
    """A private copy of the shipped digits ONNX and its manifest in ``dest``."""
    for f in ("digits.onnx", "digits.onnx.json"):
        shutil.copyfile(ASSETS / f, dest / f)
    return dest / "digits.onnx"


def tiny_checkpoint(dest: Path) -> Path:
    """A 1-block, 32-wide digits-shaped safetensors checkpoint in ``dest`` (for refusals before export work)."""
    import dataclasses

    from ditdeploy.config.variants import DIGITS
    from ditdeploy.export.randomize import random_model
    from ditdeploy.sources.checkpoints import save_safetensors

    cfg = dataclasses.replace(DIGITS, hidden_size=32, depth=1, num_heads=2, variant="custom")
    return save_safetensors(random_model(cfg, seed=4), dest / "tiny.safetensors", cfg)


def private_mount_prefix(mountpoint: Path, options: str) -> list[str] | None:
    """``unshare`` argv prefix giving the command a private tmpfs at ``mountpoint`` (mount ``options``, e.g.
    ``size=16k`` or ``ro,size=64k``) that vanishes with it; prints ``LEFT:<names>`` of what the command left there.
    None where user namespaces or unshare are unavailable."""
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {mountpoint}"],
                           capture_output=True)
    if probe.returncode != 0:
        return None
    script = (f'mount -t tmpfs -o {options} tmpfs {mountpoint} || exit 99; "$@"; rc=$?; '
              f'echo "LEFT:$(ls -A {mountpoint} | tr "\\n" " ")"; exit $rc')
    return ["unshare", "-rm", "sh", "-c", script, "sh"]
