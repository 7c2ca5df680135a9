"""Hostile / careless-user cases of the commands and flags added today (fid, export --dry-run / --cache-graphs,
check --trt-lint, sample --output-format, bench's new options), one test per class of defect found: each failed on
main before the fix (exit 0 with a destroyed input or an ignored flag, or exit 1 with a raw exception) and now gives
one ``error:`` line (exit 2) with nothing written. Real files, real device nodes (``mknod`` in a temp folder, never
the real /dev); the shipped digits artifact; no export work runs."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_main

ASSETS = Path(__file__).resolve().parents[1] / "ditdeploy" / "assets"


@pytest.fixture
def digits(tmp_path) -> Path:
    """A copy of the shipped digits ONNX with its manifest."""
    for name in ("digits.onnx", "digits.onnx.json"):
        shutil.copyfile(ASSETS / name, tmp_path / name)
    return tmp_path / "digits.onnx"


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("target", ["model", "manifest"])
def test_trt_lint_json_never_replaces_the_linted_model(digits, target):
    """check --trt-lint M --json M (or M's manifest) overwrote the model with the report (exit 0)."""
    before = _snapshot(digits.parent)
    out = digits if target == "model" else digits.with_name(digits.name + ".json")
    code, _, err = run_main(["check", "--trt-lint", digits, "--json", out])
    assert_one_line_error(code, err, ["--json", "input"])
    assert code == 2 and _snapshot(digits.parent) == before


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "diffusers", "aoti"])
def test_dry_run_outside_trt_is_refused_and_writes_nothing(tmp_path, fmt):
    """export --dry-run was ignored for onnx/openvino/diffusers: the full artifact was written (exit 0)."""
    out = tmp_path / {"onnx": "m.onnx", "openvino": "m.xml", "diffusers": "snap", "aoti": "m.pt2"}[fmt]
    code, _, err = run_main(["export", "--model", "digits", "--fmt", fmt, "--dry-run", "--out", out])
    assert_one_line_error(code, err, ["--dry-run", "trt"])
    assert code == 2 and list(tmp_path.iterdir()) == []


def test_cache_graphs_light_graph_is_checked_before_the_export(tmp_path):
    """export --cache-graphs --out M.onnx when M.light.onnx is a device: refused by the output policy up front (was
    only caught by the writer after the export, with a message that did not name the flag)."""
    if os.geteuid() != 0:
        pytest.skip("mknod of a character device needs root")
    node = tmp_path / "m.light.onnx"
    os.mknod(node, 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    code, _, err = run_main(["export", "--model", "digits", "--cache-graphs", "--out", tmp_path / "m.onnx"])
    line = assert_one_line_error(code, err, ["light graph", "character device"], strict=False)
    assert code == 2 and "never replaced" in line
    assert stat.S_ISCHR(os.lstat(node).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["m.light.onnx"]


def test_cache_graphs_light_graph_may_not_be_an_input(tmp_path):
    """The light graph's path naming the run's --checkpoint (the same file under another name) is refused before
    the export."""
    ck = tmp_path / "ck.safetensors"
    shutil.copyfile(ASSETS / "digits.safetensors", ck)
    os.link(ck, tmp_path / "m.light.onnx")  # --out m.onnx -> light graph m.light.onnx: the checkpoint's inode
    before = ck.read_bytes()
    code, _, err = run_main(["export", "--checkpoint", ck, "--cache-graphs", "--out", tmp_path / "m.onnx"])
    assert_one_line_error(code, err, ["light graph", "input"], strict=False)
    assert code == 2 and ck.read_bytes() == before and not (tmp_path / "m.onnx").exists()


def test_output_format_must_agree_with_the_out_suffix(digits):
    """sample --output-format jpg --out x.png wrote JPEG bytes into x.png (exit 0)."""
    out = digits.parent / "x.png"
    code, _, err = run_main(["sample", "-e", digits, "--labels", "1", "--steps", "1", "--output-format", "jpg",
                             "--out", out, "--no-progress"])
    assert_one_line_error(code, err, ["--output-format", "--out"])
    assert code == 2 and not out.exists()


@pytest.mark.parametrize("flag,value", [("--probe-size", "-1"), ("--probe-size", "0"), ("--threads", "-2")])
def test_bench_bad_sizes_refused_before_any_work(digits, flag, value):
    """bench --probe-size -1 ran every target, then died with exit 1 (ValueError); --threads -2 ran with every
    OpenVINO target failing on a runtime message (exit 0). Fixed on main meanwhile by the flags' bounds (kept as a
    guard)."""
    csv = digits.parent / "r.csv"
    code, _, err = run_main(["bench", "-e", digits, "--probe", flag, value, "--steps", "1", "--repeats", "1",
                             "--csv", csv])
    assert_one_line_error(code, err, [flag])
    assert code == 2 and not csv.exists()


def test_fid_json_naming_an_input_or_a_device(tmp_path):
    """fid --json: an input (samples, a hard link to --ref) is refused; a symlink to a character device is written
    through (never replaced) — already right before today's fixes; kept as a guard for the new command."""
    rng = np.random.default_rng(0)
    samples, ref = tmp_path / "s.npz", tmp_path / "r.npz"
    np.savez(samples, arr_0=rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8))
    np.savez(ref, arr_0=rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8))
    os.link(ref, tmp_path / "hard.json")
    before = _snapshot(tmp_path)
    for out in (samples, tmp_path / "hard.json"):
        code, _, err = run_main(["fid", samples, "--ref", ref, "--extractor", "digits", "--no-pr", "--no-progress",
                                 "--json", out])
        assert_one_line_error(code, err, ["--json", "input"])
        assert code == 2 and _snapshot(tmp_path) == before


@pytest.mark.parametrize("role", ["samples", "--ref", "--inception"])
def test_fid_input_that_is_a_device_is_named_as_such(tmp_path, role):
    """fid given a device node as an input said 'not found' / 'does not exist' (it exists: it is not a regular
    file)."""
    if os.geteuid() != 0:
        pytest.skip("mknod of a character device needs root")
    node = tmp_path / "node"
    os.mknod(node, 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    good = tmp_path / "s.npz"
    np.savez(good, arr_0=np.zeros((4, 8, 8, 1), dtype=np.uint8))
    args = {"samples": [node, "--ref", "digits"], "--ref": [good, "--ref", node, "--extractor", "digits"],
            "--inception": [good, "--ref", good, "--extractor", "inception", "--inception", node]}[role]
    code, _, err = run_main(["fid", *args, "--no-progress"])
    assert_one_line_error(code, err, ["node", "not a regular file"])
    assert code == 2 and stat.S_ISCHR(os.lstat(node).st_mode)


def test_damaged_ditdeploy_snapshot_is_refused_before_export(tmp_path):
    """export --checkpoint SNAPSHOT_DIR: a byte changed in a ditdeploy-written snapshot's weights (still a valid
    safetensors file) was exported silently with the wrong weights; its ditdeploy_manifest.json sha256s are now
    checked."""
    snap = tmp_path / "snap"
    code, _, err = run_main(["export", "--model", "digits", "--fmt", "diffusers", "--out", snap, "--no-verify"])
    assert code == 0, err
    w = next((snap / "transformer").glob("*.safetensors"))
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x01  # the last weight byte: the file still parses
    w.write_bytes(bytes(data))
    out = tmp_path / "m.onnx"
    code, _, err = run_main(["export", "--checkpoint", snap, "--out", out, "--no-verify"])
    assert_one_line_error(code, err, ["damaged", w.name], strict=False)
    assert code == 2 and not out.exists()
