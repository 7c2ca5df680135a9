"""CLI wiring of the reduced-work options: `sample --cfg-interval/--cache-interval/--json`, `export --cache-graphs`,
bad inputs (one line, exit 2, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_export import tiny_model
from test_export_cli import run_cli

from ditdeploy.config.macs import full_macs, light_macs
from ditdeploy.sources.checkpoints import save_safetensors


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = tiny_model(space="pixel", in_channels=1)
    path = d / "tiny.safetensors"
    save_safetensors(model, path, model.config)
    return path, model


def test_json_summary_counts_the_work_actually_done(tmp_path, capsys):
    js = tmp_path / "run.json"
    code, _, err = run_cli(["sample", "--labels", "3,5", "--steps", "10", "--cfg-interval", "150,750", "--json",
                            str(js), "--out", str(tmp_path / "s.png"), "--no-progress", "--npz",
                            str(tmp_path / "s.npz")], capsys)
    assert code == 0, err
    s = json.loads(js.read_text())
    # ddim 10: t = 0, 100, ..., 900; guided (4 rows) at 200..700 (6 steps), conditional-only (2 rows) at 4 steps
    assert s["guidance"] == {"scale": 4.0, "interval": [150, 750]} and s["cache_interval"] is None
    assert (s["denoiser"]["calls"], s["denoiser"]["rows"]) == (10, 6 * 4 + 4 * 2)
    from ditdeploy.config.variants import DIGITS

    assert s["denoiser"]["gmac"] == pytest.approx(32 * full_macs(DIGITS) / 1e9, rel=1e-3)
    t = s["timings"]
    assert set(t) >= {"load_s", "denoiser_s", "decode_s", "overhead_s", "total_s"}
    assert t["total_s"] >= t["load_s"] + t["denoiser_s"]
    # full guidance, same seeds: the interval changes the samples (by design)
    code, _, err = run_cli(["sample", "--labels", "3,5", "--steps", "10", "--npz", str(tmp_path / "f.npz"),
                            "--no-out", "--no-progress"], capsys)
    assert code == 0, err
    a, b = np.load(tmp_path / "s.npz")["arr_0"], np.load(tmp_path / "f.npz")["arr_0"]
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() > 0


def test_cache_interval_on_torch_counts_light_rows(tmp_path, capsys, tiny_ckpt):
    js = tmp_path / "run.json"
    code, _, err = run_cli(["sample", "--engine", str(tiny_ckpt[0]), "--labels", "1,2", "--steps", "6",
                            "--cache-interval", "3", "--json", str(js), "--out", str(tmp_path / "s.png"),
                            "--no-progress"], capsys)
    assert code == 0, err
    s = json.loads(js.read_text())
    d = s["denoiser"]
    assert (d["calls"], d["rows"], d["light_calls"], d["light_rows"]) == (6, 24, 4, 16)
    cfg = tiny_ckpt[1].config
    assert d["gmac"] == pytest.approx((8 * full_macs(cfg) + 16 * light_macs(cfg)) / 1e9, rel=1e-3)


@pytest.mark.parametrize("args, needle", [
    (["--cfg-interval", "750,150"], "cfg interval"),
    (["--cfg-interval", "0,1000"], "cfg interval"),
    (["--cfg-interval", "-5,10"], "cfg interval"),
    (["--cache-interval", "0"], "cache interval"),
    (["--cache-interval", "2"], "cannot reuse features"),  # the shipped digits.onnx is a one-graph artifact
])
def test_bad_sample_options_write_nothing(tmp_path, capsys, args, needle):
    out, js = tmp_path / "s.png", tmp_path / "r.json"
    code, _, err = run_cli(["sample", "--steps", "2", "--out", str(out), "--json", str(js), "--no-progress", *args],
                           capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_export_cache_graphs_cli(tmp_path, capsys, tiny_ckpt):
    out = tmp_path / "pair.onnx"
    code, o, err = run_cli(["export", "--checkpoint", str(tiny_ckpt[0]), "--cache-graphs", "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair.light.onnx", "pair.onnx", "pair.onnx.json"]
    js = tmp_path / "r.json"
    code, _, err = run_cli(["sample", "--engine", str(out), "--labels", "1", "--steps", "4", "--cache-interval", "2",
                            "--json", str(js), "--out", str(tmp_path / "s.png"), "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads(js.read_text())["denoiser"]["light_calls"] == 2
    (tmp_path / "pair.light.onnx").unlink()
    code, _, err = run_cli(["sample", "--engine", str(out), "--steps", "2", "--cache-interval", "2",
                            "--out", str(tmp_path / "t.png"), "--no-progress"], capsys)
    assert code == 2 and "missing" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t.png").exists()
    code, _, err = run_cli(["export", "--checkpoint", str(tiny_ckpt[0]), "--cache-graphs", "--precision", "fp16",
                            "--out", str(tmp_path / "x.onnx")], capsys)
    assert code == 2 and "--cache-graphs" in err and not (tmp_path / "x.onnx").exists()


def test_check_and_bench_take_the_same_options(tmp_path, capsys, tiny_ckpt):
    """check: the artifact's end-to-end run uses the options, the reference stays full work; bench: e2e rows record
    the work done."""
    js = tmp_path / "c.json"
    code, _, err = run_cli(["check", "--engine", "ditdeploy/assets/digits.onnx", "--steps", "6", "--batch-size", "2",
                            "--timesteps", "2", "--cfg-interval", "300,700", "--json", str(js),
                            "--threshold-latent-rel-l2", "10", "--threshold-psnr", "0", "--threshold-ssim", "0"],
                           capsys)
    assert code == 0, err
    rep = json.loads(js.read_text())
    assert rep["settings"]["cfg_interval"] == [300, 700]
    assert rep["end_to_end"]["latent_rel_l2"] > 1e-3  # the interval changes the samples: measured, not hidden
    code, _, err = run_cli(["check", "--engine", "ditdeploy/assets/digits.onnx", "--cache-interval", "2"], capsys)
    assert code == 2 and "cannot reuse features" in err
    bj = tmp_path / "b.json"
    code, _, err = run_cli(["bench", "--engine", "ditdeploy/assets/digits.onnx", "--backends", "onnxruntime",
                            "--batch-sizes", "2", "--steps", "4", "--repeats", "1", "--warmup", "0",
                            "--cfg-interval", "150,750", "--no-probe", "--no-torch", "--in-process",
                            "--json", str(bj)], capsys)
    assert code == 0, err
    row = json.loads(bj.read_text())["rows"][0]
    assert (row["cache_interval"], row["cfg_interval"]) == (None, [150, 750])
    # ddim 4: t = 750, 500, 250, 0 -> three guided steps of 4 rows, one conditional-only step of 2
    assert (row["e2e_denoiser_rows"], row["e2e_light_rows"]) == (14, 0) and row["e2e_gmac"] > 0
    code, _, err = run_cli(["bench", "--cfg-interval", "5,1", "--json", str(tmp_path / "x.json")], capsys)
    assert code == 2 and "cfg interval" in err and not (tmp_path / "x.json").exists()
