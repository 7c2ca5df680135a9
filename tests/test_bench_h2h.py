"""experiments/h2h_diffusers.py: the head-to-head's bookkeeping (fast) and a small end-to-end smoke run (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import h2h_diffusers as h2h

REPO = Path(__file__).resolve().parents[1]


def test_summary_ratios_are_diffusers_over_contender():
    res = {
        "diffusers": {"times_s": [80.0, 100.0, 90.0], "cpu_s": [160.0, 170.0, 150.0], "denoiser_s": [70.0],
                      "peak_rss_mb": 3000.0, "runtime": "diffusers"},
        "ort-int8": {"times_s": [30.0], "cpu_s": [50.0], "denoiser_s": [25.0], "decoder_s": [4.0],
                     "peak_rss_mb": 1500.0, "runtime": "ort", "latent_rel_l2_vs_torch": 0.02},
        "torch": {"error": "boom"},
    }
    rows = h2h.summarize(res, ["diffusers", "ort-int8", "torch"], batch=2)
    d, o, t = rows
    assert d["e2e_s_median"] == 90.0 and d["speedup_vs_diffusers"] == 1.0
    assert o["speedup_vs_diffusers"] == pytest.approx(3.0) and o["cpu_speedup_vs_diffusers"] == pytest.approx(3.2)
    assert o["images_per_s"] == pytest.approx(2 / 30.0) and o["decoder_s"] == 4.0
    assert t == {"contender": "torch", "error": "boom"}
    text = h2h.format_h2h({"work": {"model": "XL/2", "image_size": 256, "batch": 2, "steps": 25, "cfg_scale": 4.0,
                                    "repeats": 3}, "machine": {"cpu": "cpu"}, "rows": rows})
    assert "3.00" in text and "error: boom" in text


@pytest.mark.slow
def test_h2h_smoke_small_model(tmp_path):
    """S/2 at 64 px, 2 steps: every contender runs the same work; ditdeploy fp32 matches the torch loop."""
    out = tmp_path / "h2h.json"
    p = subprocess.run([sys.executable, "-m", "experiments.h2h_diffusers", "--model", "S/2", "--image-size", "64",
                        "--steps", "2", "--contenders", "diffusers,torch,ort-fp32,ort-int8", "--workdir",
                        str(tmp_path / "w"), "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                       timeout=1800)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = {r["contender"]: r for r in res["rows"]}
    assert all("error" not in r for r in rows.values()), rows
    assert rows["ort-fp32"]["latent_rel_l2_vs_torch"] < 1e-4  # same weights, noise and sampler: same latents
    assert rows["ort-int8"]["latent_rel_l2_vs_torch"] < 0.3
    assert res["raw"]["diffusers"]["denoiser_calls"] == 2 and res["raw"]["torch"]["denoiser_calls"] == 2
    assert res["machine"]["cpu"] and res["work"]["steps"] == 2


@pytest.mark.slow  # ~3 min on a quiet 2-core machine (diffusers + three exports of S/8)
def test_h2h_paired_auto_int8_and_recipe_from_a_fresh_workdir(tmp_path):
    """The documented paired command works on a fresh machine (it used to need artifacts that only the ort-int8
    contender's prepare built, and a static INT8 file nothing built: `--paired-ov-int8 auto` builds it with the
    calibrate -> quantize-the-fp32-export chain); the `recipe` contender runs a tuned recipe of the same weights."""
    from ditdeploy.run.generation import SampleRequest  # noqa: F401  (the recipe library is importable here)
    from ditdeploy.run.recipes import Recipe, save_recipe

    wd = tmp_path / "w"
    base = [sys.executable, "-m", "experiments.h2h_diffusers", "--model", "S/8", "--image-size", "64",
            "--steps", "2", "--workdir", str(wd), "--threads", "1"]
    out = tmp_path / "paired.json"
    p = subprocess.run([*base, "--contenders", "ort-pair", "--paired", "1", "--paired-ov-int8", "auto", "--out",
                        str(out)], capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    med = res["raw"]["paired"]["median_s"]
    assert set(med) == {"diffusers", "ort-fp32", "ort-int8", "ov-int8-qdq"} and all(v > 0 for v in med.values())
    built = res["raw"]["prepare-static-int8"]
    assert built["calibrate_calls"] == 2 and built["calibrate_rows"] == 2 * 2 * 2  # 1 + 1 trajectories together
    assert res["machine"]["cpu_isa"]["flags"] and res["machine"]["load_avg_1_5_15"] and res["machine"]["load_avg_end"]
    # a recipe on the same weights' pair: guidance interval + feature reuse on ONNX Runtime
    pair = next(wd.glob("*/dit-S8-64-pair.onnx"))
    from ditdeploy.artifact.files import sha256_file

    recipe = tmp_path / "r.json"
    save_recipe(recipe, Recipe(engine=str(pair), engine_sha256=sha256_file(pair), backend="onnxruntime",
                               options={"threads": 1}, cfg_interval=[150, 750], cache_interval=2))
    out2 = tmp_path / "recipe.json"
    p = subprocess.run([*base, "--contenders", "ort-pair,recipe", "--recipe", str(recipe), "--out", str(out2)],
                       capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r["contender"]: r for r in json.loads(out2.read_text())["rows"]}
    r = rows["recipe"]
    assert "error" not in r and r["cfg_interval"] == [150, 750] and r["cache_interval"] == 2
    assert 0 < r["latent_drift_vs_full_work"]["rel_l2"] < 1  # priced against the same weights' full work
    bad = subprocess.run([*base, "--contenders", "", "--paired", "1", "--paired-ov-int8", str(tmp_path / "no.onnx")],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert bad.returncode == 2 and "no such file" in bad.stderr and "auto" in bad.stderr


def test_h2h_refuses_missing_static_int8_and_recipe_up_front(tmp_path, capsys):
    """A --paired-ov-int8 file that does not exist (the documented command on a fresh machine) or a recipe
    contender without --recipe: one argparse line before any export starts; 'auto' is accepted."""
    for argv, frag in ((["--paired", "1", "--paired-ov-int8", str(tmp_path / "no.onnx")], "pass 'auto'"),
                       (["--contenders", "recipe"], "needs --recipe")):
        with pytest.raises(SystemExit) as e:
            h2h.main(["--contenders", "", "--workdir", str(tmp_path / "w"), *argv])
        assert e.value.code == 2 and frag in capsys.readouterr().err
    assert h2h._ov_int8(h2h.Work(workdir=str(tmp_path), model="S/8", image_size=64, ov_int8="auto")) == str(
        tmp_path / "dit-S8-64-int8.onnx")
