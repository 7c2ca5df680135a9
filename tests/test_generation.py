"""The sampling library (`ditdeploy.run.generation`): typed request/result, JSON for shard workers, `--output-format`,
and the rule that nothing outside `ditdeploy/commands/` imports a command module."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_main
from PIL import Image

from ditdeploy.errors import DitDeployError
from ditdeploy.run.generation import SampleRequest, generate

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "3", "--num-per-label", "1", "--no-progress"]


def test_library_result_equals_the_cli_npz(tmp_path):
    """generate() with no outputs returns the same uint8 images the CLI writes, plus latents and timings."""
    code, _, err = run_main(["sample", *FAST, "--seed", "5", "--npz", tmp_path / "cli.npz", "--no-out"])
    assert code == 0, err
    res = generate(SampleRequest(steps=3, num_per_label=1, seed=5, out=None))
    with np.load(tmp_path / "cli.npz") as z:
        np.testing.assert_array_equal(res.images, z["arr_0"])
        np.testing.assert_array_equal(res.labels, z["labels"])
    assert res.images.shape == (10, 8, 8, 1) and res.latents.shape == (10, 1, 8, 8)
    assert res.latents.dtype == np.float32 and np.isfinite(res.latents).all()
    # the uint8 images are the official conversion of the returned latents (pixel model: no decoder)
    from ditdeploy.run.images import to_uint8

    np.testing.assert_array_equal(to_uint8(res.latents), res.images)
    assert res.written == [] and res.count == 10 and res.cfg_scale == 4.0
    assert res.timings.denoiser_calls == 3 and res.timings.total_s >= res.timings.denoiser_s > 0


def test_request_json_round_trip_covers_every_field(tmp_path):
    """Shard workers get the request as JSON: every field survives, whatever its type (a new field needs no code)."""
    req = SampleRequest(engine=tmp_path / "m.onnx", backend="onnxruntime", options={"threads": 2}, vae=None,
                        labels=[1, 2], num_per_label=3, sampler="ddpm", steps=7, cfg_scale=1.5, eta=0.0, seed=9,
                        batch_size=4, out=tmp_path / "g.jpg", output_format="jpg", npz=tmp_path / "s.npz",
                        shards=1, shard=[1, 2], guide_all_channels=True, progress=False)
    back = SampleRequest.from_json(req.to_json())
    assert back == req and isinstance(back.engine, Path) and isinstance(back.out, Path)
    defaults = SampleRequest()
    assert SampleRequest.from_json(defaults.to_json()) == defaults
    assert {f.name for f in dataclasses.fields(SampleRequest)} <= set(__import__("json").loads(req.to_json()))
    with pytest.raises(DitDeployError, match="unknown field"):
        SampleRequest.from_json('{"stepz": 3}')


def test_unknown_backend_option_is_refused():
    with pytest.raises(DitDeployError, match="unknown backend option.*thread.*valid are"):
        generate(SampleRequest(options={"thread": 1}, out=None))


def test_output_format_jpg_end_to_end(tmp_path):
    """--output-format jpg writes a JPEG grid whose pixels match the PNG grid up to JPEG loss; a .jpg --out picks
    jpg by itself; the default stays PNG."""
    common = ["sample", *FAST, "--seed", "1"]
    for name, extra in (("g.png", []), ("g-jpg.img", ["--output-format", "jpg"]), ("g.jpg", [])):
        code, _, err = run_main([*common, "--out", tmp_path / name, *extra])
        assert code == 0, err
    png, jpg, by_suffix = (Image.open(tmp_path / n) for n in ("g.png", "g-jpg.img", "g.jpg"))
    assert (png.format, jpg.format, by_suffix.format) == ("PNG", "JPEG", "JPEG")
    a, b = np.asarray(png.convert("RGB"), np.int16), np.asarray(jpg.convert("RGB"), np.int16)
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 4.0  # quality-95 JPEG of a flat labelled grid: mean error ~1 grey level
    assert (tmp_path / "g-jpg.img").read_bytes() == (tmp_path / "g.jpg").read_bytes()
    # a format that contradicts an image suffix is refused (a PNG inside p.jpg would mislead every viewer)
    code, _, err = run_main([*common, "--out", tmp_path / "p.jpg", "--output-format", "png"])
    assert_one_line_error(code, err, "--output-format")
    assert not (tmp_path / "p.jpg").exists()


def test_output_format_bad_value_fails_in_the_parser(tmp_path):
    code, _, err = run_main(["sample", *FAST, "--out", tmp_path / "x.gif", "--output-format", "gif"])
    assert_one_line_error(code, err, ["--output-format", "gif"])
    assert code == 2 and not (tmp_path / "x.gif").exists()


def test_worker_entry_runs_a_json_request(tmp_path):
    """The hidden worker entry (`python -m ditdeploy.run.generation REQ.json`) samples its shard; bad JSON fields are
    one line."""
    req = SampleRequest(steps=2, num_per_label=1, out=None, npz=tmp_path / "w.npz", shard=[1, 2])
    f = tmp_path / "req.json"
    f.write_text(req.to_json())
    p = subprocess.run([sys.executable, "-m", "ditdeploy.run.generation", str(f)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    from ditdeploy.run.shard_workers import part_path

    with np.load(part_path(tmp_path / "w.npz", 1, 2)) as z:
        np.testing.assert_array_equal(z["index"], np.arange(5, 10))
    f.write_text('{"stepz": 1}')
    p = subprocess.run([sys.executable, "-m", "ditdeploy.run.generation", str(f)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == "error: sample request has unknown field(s) stepz"


def _python_files() -> list[Path]:
    skip = {".venv", ".git", "build", "results"}
    return [p for p in ROOT.rglob("*.py") if not (set(p.relative_to(ROOT).parts) & skip)]


def _command_imports(source: str, name: str = "<src>") -> list[int]:
    """Line numbers of imports of ``ditdeploy.commands`` (or a module in it) in ``source``."""
    lines = []
    for node in ast.walk(ast.parse(source, name)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        if any(n == "ditdeploy.commands" or n.startswith("ditdeploy.commands.") for n in names):
            lines.append(node.lineno)
    return lines


def test_nothing_outside_commands_imports_a_command_module():
    """Commands are thin wiring: library code, bench scripts, experiments and tests call the library. Only the CLI
    (`ditdeploy/cli.py`, which registers them) and the command modules themselves import `ditdeploy.commands`."""
    allowed = {ROOT / "ditdeploy" / "cli.py"}
    files = _python_files()
    assert len(files) > 50  # the scan really sees the tree
    offenders = [f"{p.relative_to(ROOT)}:{ln}" for p in files
                 if p not in allowed and (ROOT / "ditdeploy" / "commands") not in p.parents
                 for ln in _command_imports(p.read_text(), str(p))]
    assert offenders == [], offenders


def test_the_import_scan_catches_an_offender():
    """The scan above is not vacuous: each import form of a command module is found, other imports are not."""
    src = ("import ditdeploy.commands.bench\nfrom ditdeploy import commands\nfrom ditdeploy.commands import sample\n"
           "def f():\n    from ditdeploy.commands.sample import register\nimport ditdeploy.run.generation\n")
    assert _command_imports(src) == [1, 2, 3, 5]
