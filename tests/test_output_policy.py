"""The output-path policy (issue 14, ditdeploy.artifact.output_policy) through the real CLI on real files: an output may not be an
input or another output, devices/FIFOs are written through or refused (never replaced), symlinks are followed,
artifact sets are published as a unit, leftovers of a killed run are cleaned by the next run, and destinations are
checked (writable, free space, memory for the count) before any work.

Device nodes are made with ``mknod`` in a temporary folder (never the real /dev); the test skips where mknod is not
permitted. Each case asserts what happened to the real file afterwards (sha256, file type), not only the message.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    KILL_BEFORE_RENAME,
    assert_one_line_error,
    private_mount_prefix,
    run_main,
    shipped_digits_copy,
    tiny_checkpoint,
)

from ditdeploy.artifact.files import sha256_file

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "ditdeploy" / "assets"
FAST = ["--steps", "2", "--no-progress", "--num-per-label", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def model(tmp_path) -> Path:
    return shipped_digits_copy(tmp_path)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("policy"))


def _chardev(path: Path) -> Path:
    """A character device with /dev/null's numbers (1, 3) at ``path`` (a temp folder), or skip."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError) as e:
        pytest.skip(f"mknod not permitted here: {e}")
    return path


def _is_chardev(p: Path) -> bool:
    return stat.S_ISCHR(os.lstat(p).st_mode)


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(d.iterdir()) if p.is_file() and not p.is_symlink()}


# --------------------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("alias", ["same", "relative", "hardlink", "symlink", "manifest", "npz-is-engine"])
def test_sample_output_that_is_an_input_is_refused(model, tmp_path, alias, monkeypatch):
    d = model.parent
    before = _hashes(d)
    out_flag = "--out"
    if alias == "same":
        out = model
    elif alias == "relative":
        monkeypatch.chdir(d)
        out = Path("sub/../digits.onnx")
        (d / "sub").mkdir()
    elif alias == "hardlink":
        out = d / "grid.png"
        os.link(model, out)
        before = _hashes(d)
    elif alias == "symlink":
        out = d / "grid.png"
        out.symlink_to(model)
    elif alias == "manifest":
        out = d / "digits.onnx.json"
    else:
        out_flag, out = "--npz", model
    code, _, err = run_main(["sample", "--engine", model, out_flag, out, *FAST])
    assert_one_line_error(code, err, ("input",))
    assert _hashes(d) == before  # the model, its manifest (and the hard link) are byte-identical


def test_two_outputs_naming_one_file_are_refused(model, tmp_path):
    out = tmp_path / "o"
    (out / "sub").mkdir(parents=True)
    for npz in (out / "g.png", out / "sub" / ".." / "g.png"):
        code, _, err = run_main(["sample", "--engine", model, "--out", out / "g.png", "--npz", npz, *FAST])
        assert_one_line_error(code, err, ("same file",))
    assert not (out / "g.png").exists()
    (out / "g.png").write_bytes(b"old")
    os.link(out / "g.png", out / "h.npz")  # two names, one file
    code, _, err = run_main(["sample", "--engine", model, "--out", out / "g.png", "--npz", out / "h.npz", *FAST])
    assert_one_line_error(code, err, ("same file",))
    assert (out / "g.png").read_bytes() == b"old"


def test_export_over_its_own_checkpoint_is_refused(tiny_ckpt, tmp_path):
    ck = tmp_path / "ck.safetensors"
    shutil.copyfile(tiny_ckpt, ck)
    link = tmp_path / "m.onnx"
    link.symlink_to(ck)
    h = sha256_file(ck)
    code, _, err = run_main(["export", "--checkpoint", ck, "--out", link, "--no-verify"])
    assert_one_line_error(code, err, ("input",), strict=False)
    assert sha256_file(ck) == h and link.is_symlink()


# --------------------------------------------------------------------------------------------------------- devices
def test_sample_writes_through_a_device_and_a_symlink_to_it(model, tmp_path):
    dev = _chardev(tmp_path / "null")
    link = tmp_path / "link.png"
    link.symlink_to(dev)
    for out in (dev, link):
        code, _, err = run_main(["sample", "--engine", model, "--out", out, *FAST])
        assert code == 0, err
    assert _is_chardev(dev) and link.is_symlink() and os.readlink(link) == str(dev)
    code, _, err = run_main(["sample", "--engine", model, "--no-out", "--npz", dev, *FAST])
    assert code == 0, err
    assert _is_chardev(dev)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_sample_writes_through_a_fifo(model, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    got = bytearray()

    def reader():
        with open(fifo, "rb") as f:
            got.extend(f.read())

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    code, _, err = run_main(["sample", "--engine", model, "--out", fifo, *FAST])
    th.join(30)
    assert code == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert bytes(got[:8]) == PNG_MAGIC and len(got) > 100  # the whole PNG went through the pipe


def test_artifact_sets_refuse_devices_and_sockets(tiny_ckpt, model, tmp_path):
    dev = _chardev(tmp_path / "m.onnx")
    code, _, err = run_main(["export", "--checkpoint", tiny_ckpt, "--out", dev, "--no-verify"])
    assert_one_line_error(code, err, ("character device",), strict=False)
    assert _is_chardev(dev)
    sock_path = tmp_path / "s.png"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    try:
        code, _, err = run_main(["sample", "--engine", model, "--out", sock_path, *FAST])
        assert_one_line_error(code, err, ("socket",))
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    finally:
        s.close()
    # the manifest beside an artifact counts too: a device at m2.onnx.json is never replaced
    dev2 = _chardev(tmp_path / "m2.onnx.json")
    code, _, err = run_main(["export", "--checkpoint", tiny_ckpt, "--out", tmp_path / "m2.onnx", "--no-verify"])
    assert_one_line_error(code, err, ("character device",), strict=False)
    assert _is_chardev(dev2) and not (tmp_path / "m2.onnx").exists()


def test_symlink_to_a_regular_file_is_replaced_not_followed(model, tmp_path):
    target = tmp_path / "real" / "grid.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "grid.png"
    link.symlink_to(target)
    code, _, err = run_main(["sample", "--engine", model, "--out", link, *FAST])
    assert code == 0, err
    assert not link.is_symlink() and link.read_bytes()[:8] == PNG_MAGIC and target.read_bytes() == b"old"


# --------------------------------------------------------------------------------------------------------- units
def test_manifest_path_that_cannot_be_written_leaves_nothing(tiny_ckpt, tmp_path):
    """The manifest's final name is taken by a folder: refused before the export, no model without manifest."""
    (tmp_path / "m.onnx.json").mkdir()
    code, _, err = run_main(["export", "--checkpoint", tiny_ckpt, "--out", tmp_path / "m.onnx", "--no-verify"])
    assert_one_line_error(code, err, ("directory",), strict=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.json"]


def test_failed_publish_takes_back_what_was_moved(tmp_path):
    """atomic_dir: when the manifest's rename fails after the data's, the data is taken back and the previous
    version of every file restored (real renames; the manifest's final name becomes a non-empty folder mid-way)."""
    from ditdeploy.artifact.files import atomic_dir
    from ditdeploy.errors import DitDeployError

    data, art, man = tmp_path / "m.onnx.data", tmp_path / "m.onnx", tmp_path / "m.onnx.json"
    data.write_bytes(b"old data")
    art.write_bytes(b"old model")
    with pytest.raises(DitDeployError):
        with atomic_dir([data, art, man]) as tmp:
            for f, b in ((data, b"new data"), (art, b"new model"), (man, b"{}")):
                (tmp / f.name).write_bytes(b)
            man.mkdir()
            (man / "x").write_text("taken")
    assert data.read_bytes() == b"old data" and art.read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "m.onnx.json"]


def test_next_run_cleans_what_a_killed_run_left(model, tmp_path):
    out = tmp_path / "o"
    args = ["sample", "--engine", model, "--out", out / "g.png", *FAST]
    env = {**os.environ, "DITDEPLOY_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-c", KILL_BEFORE_RENAME, str(out / "g.png"), *map(str, args)], cwd=REPO,
                       env=env, capture_output=True, timeout=300)
    assert r.returncode == -signal.SIGKILL
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".g.png."), left  # the killed run's temporary file
    code, _, err = run_main(args)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["g.png"]
    assert "removed 1 temporary file" in err and left[0] in err


def test_a_live_runs_temporary_file_is_left_alone(model, tmp_path):
    from ditdeploy.artifact.files import temp_prefix

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / (temp_prefix("g.png").replace(str(os.getpid()), str(p.pid)) + "abcd1234.png")
        live.write_bytes(b"partial")
        code, _, err = run_main(["sample", "--engine", model, "--out", tmp_path / "g.png", *FAST])
        assert code == 0, err
        assert live.exists()
    finally:
        p.kill()
        p.wait()


# --------------------------------------------------------------------------------------------------------- early
def test_absurd_image_count_is_refused_before_any_work(model, tmp_path):
    t0 = time.perf_counter()
    code, _, err = run_main(["sample", "--engine", model, "--num-per-label", "2000000000", "--out",
                             tmp_path / "g.png", "--steps", "2", "--no-progress"])
    assert_one_line_error(code, err, ("memory", "GiB"))
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "g.png").exists()


def test_full_destination_is_refused_before_sampling(model, tmp_path):
    """1000 images (64 KB of npz) into a 16 KiB file system: refused before the first denoiser call."""
    small = tmp_path / "small"
    small.mkdir()
    prefix = private_mount_prefix(small, "size=16k")
    if prefix is None:
        pytest.skip("cannot mount a private tmpfs here (needs unshare + user namespaces)")
    env = {**os.environ, "DITDEPLOY_NO_PROGRESS": "1"}
    cmd = [*prefix, sys.executable, "-m", "ditdeploy", "sample", "--engine", str(model), "--num-per-label", "100",
           "--steps", "50", "--no-out", "--npz", str(small / "s.npz")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert_one_line_error(r.returncode, r.stderr, ("disk space", "--npz", "free"))
    assert r.stdout.strip().splitlines()[-1] == "LEFT:", r.stdout
