"""One CLI vocabulary (README "CLI conventions"): old spellings work for one release with one warning line,
choices and ranges fail in the parser, progress bars follow the terminal, --help fits 80 columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error, error_lines, run_main

ROOT = Path(__file__).resolve().parent.parent
DIGITS_ONNX = ROOT / "ditdeploy" / "assets" / "digits.onnx"
COMMANDS = ("train", "export", "calibrate", "sample", "check", "bench", "info")


def _warnings(err: str) -> list[str]:
    return [ln for ln in error_lines(err) if ln.startswith("warning:")]


def _deprecation(err: str, old: str, new: str) -> None:
    w = [ln for ln in _warnings(err) if "deprecated" in ln]
    assert w == [f"warning: {old} is deprecated and will be removed in the next release: use {new}"], err[-2000:]


def test_bench_batch_is_the_old_spelling_of_batch_sizes(tmp_path):
    js = tmp_path / "b.json"
    fast = ["bench", "--no-torch", "--no-probe", "--no-e2e", "--in-process", "--repeats", "1", "--warmup", "0",
            "--backends", "onnxruntime", "--json", js]
    code, _, err = run_main([*fast, "--batch", "1,3"])
    assert code == 0, err
    _deprecation(err, "--batch", "--batch-sizes")
    assert [r["batch"] for r in json.loads(js.read_text())["rows"]] == [1, 3]
    code, _, err = run_main([*fast, "--batch", "1", "--batch-sizes", "2"])
    assert_one_line_error(code, err, ["--batch is the old spelling of --batch-sizes"])


def test_check_batch_is_the_old_spelling_of_batch_size(tmp_path):
    pytest.importorskip("torch")
    js = tmp_path / "c.json"
    code, _, err = run_main(["check", "--per-call-only", "--timesteps", "1", "--batch", "3", "--json", js])
    assert code == 0, err
    _deprecation(err, "--batch", "--batch-size")
    rep = json.loads(js.read_text())
    assert rep["settings"]["batch"] == 3 and rep["calls"][0]["rows"] == 3


def test_calibrate_checkpoint_is_the_old_spelling_of_engine(tmp_path):
    out = tmp_path / "cal.npz"
    code, _, err = run_main(["calibrate", "--checkpoint", DIGITS_ONNX, "--samples", "1", "--steps", "2",
                             "--timesteps", "1", "--val-samples", "0", "--out", out, "--no-progress"])
    assert code == 0, err
    _deprecation(err, "--checkpoint", "--engine")
    assert json.loads(out.with_name(out.name + ".json").read_text())["source"]["path"] == "digits.onnx"


@pytest.mark.parametrize("argv,old,new", [
    (["--batch-max", "4"], "--batch-max", "--max-batch"),
    (["--precision", "int8-dynamic"], "--precision int8-dynamic", "--precision int8 --int8-mode dynamic"),
])
def test_export_old_spellings_warn_then_work(argv, old, new):
    # no model given: the command stops at "nothing to export" right after mapping the old spelling
    code, _, err = run_main(["export", *argv])
    _deprecation(err, old, new)
    assert error_lines(err)[-1].startswith("error: nothing to export") and code == 2


def test_export_old_and_new_spelling_together_is_an_error():
    code, _, err = run_main(["export", "--batch-max", "4", "--max-batch", "8", "--model", "digits"])
    assert_one_line_error(code, err, ["--batch-max is the old spelling of --max-batch"])


def test_info_positional_is_the_old_spelling_of_engine():
    code, out, err = run_main(["info", DIGITS_ONNX])
    assert code == 0, err
    _deprecation(err, "the positional ARTIFACT", "--engine")
    code2, out2, err2 = run_main(["info", "--engine", DIGITS_ONNX])
    assert code2 == 0 and out2 == out and _warnings(err2) == []


@pytest.mark.parametrize("argv,flag", [
    (["bench", "--sampler", "foo"], "--sampler"),
    (["check", "--sampler", "foo"], "--sampler"),
    (["calibrate", "--sampler", "foo", "--out", "x.npz"], "--sampler"),
    (["sample", "--backend", "tvm"], "--backend"),
    (["sample", "--precision-hint", "f8"], "--precision-hint"),
    (["check", "--precision", "fp8"], "--precision"),
    (["export", "--fmt", "tflite"], "--fmt"),
    (["export", "--int8-mode", "fast"], "--int8-mode"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["check", "--timesteps", "0"], "--timesteps"),
    (["export", "--opt-level", "6"], "--opt-level"),
    (["sample", "--threads", "0"], "--threads"),
])
def test_bad_choices_and_ranges_fail_in_the_parser(argv, flag, tmp_path):
    code, _, err = run_main(argv)
    line = assert_one_line_error(code, err, [flag, "invalid value"])
    assert code == 2 and "(see --help)" in line


def test_progress_follows_the_terminal(tmp_path):
    """stderr is not a terminal here: no bar by default; --progress forces it, --no-progress stays quiet."""
    common = ["sample", "--steps", "3", "--num-per-label", "1", "--out", tmp_path / "g.png"]
    code, _, quiet = run_main(common)
    assert code == 0 and "step/s" not in quiet and "%|" not in quiet
    code, _, loud = run_main([*common, "--progress"])
    assert code == 0 and "3/3" in loud


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns(command):
    env = {**os.environ, "COLUMNS": "80", "TERMINAL_WIDTH": "80"}
    p = subprocess.run([sys.executable, "-m", "ditdeploy", command, "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines and max(len(ln) for ln in lines) <= 80
    assert "<bool>" not in p.stdout  # flags show no type
    names = [ln for ln in lines if ln.lstrip("│ ").startswith("--")]
    assert names and not [ln for ln in names if "…" in ln.split()[1]], names  # option names are not cut
