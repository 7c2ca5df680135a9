"""`ditdeploy bench`: real runs on ONNX Runtime, OpenVINO and torch of a digits-sized model; every derived number
is recomputed here from the raw fields of the JSON. No timing asserts (the machine is shared)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ditdeploy.config.variants import DIGITS, DiTConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from ditdeploy.export.onnx import export_denoiser_onnx
    from ditdeploy.export.randomize import random_model
    from ditdeploy.sources.checkpoints import save_safetensors

    d = tmp_path_factory.mktemp("bench")
    model = random_model(DIGITS, seed=5)
    ckpt = save_safetensors(model, d / "tiny.safetensors", DIGITS)
    export_denoiser_onnx(model, d / "tiny.onnx", precision="fp32")
    return {"dir": d, "ckpt": ckpt, "onnx": d / "tiny.onnx"}


def _main(args: list[str]) -> int:
    from ditdeploy.cli import main

    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


FAST = ["--batch-sizes", "1,3", "--repeats", "3", "--warmup", "1", "--steps", "2", "--probe-size", "256"]


@pytest.fixture(scope="module")
def bench_run(art, tmp_path_factory):
    pytest.importorskip("openvino")
    pytest.importorskip("matplotlib")
    d = tmp_path_factory.mktemp("bench_out")
    out = {"json": d / "b.json", "csv": d / "b.csv", "plot": d / "b.png"}
    rc = _main(["bench", "--engine", str(art["onnx"]), "--backends", "onnxruntime,openvino", "--reference",
                str(art["ckpt"]), *FAST, "--json", str(out["json"]), "--csv", str(out["csv"]), "--plot",
                str(out["plot"])])
    assert rc == 0
    out["result"] = json.loads(out["json"].read_text())
    return out


def test_bench_rows_and_derived_numbers(bench_run, art):
    res = bench_run["result"]
    rows = res["rows"]
    assert not res["errors"]
    assert sorted((r["target"], r["batch"]) for r in rows) == sorted(
        (t, b) for t in ("torch eager", "onnxruntime", "openvino") for b in (1, 3))
    peaks = res["peaks"]
    assert peaks["fp32"]["gflops"] > 0 and "numpy fp32" in peaks["fp32"]["probes"]
    on_disk = sum(p.stat().st_size for p in art["dir"].iterdir() if p.name.startswith("tiny.onnx")
                  and not p.name.endswith(".json"))
    for r in rows:
        cfg = DiTConfig.from_dict(r["config"])
        assert cfg == DIGITS and r["macs_per_sample"] == DIGITS.macs()
        ms = np.array(r["denoiser_ms_all"])
        assert len(ms) == 3 and r["denoiser_ms_median"] == pytest.approx(np.median(ms), rel=1e-3)
        assert r["denoiser_ms_p90"] == pytest.approx(np.percentile(ms, 90), rel=1e-3)
        # GFLOP/s = 2 * MACs * batch / median seconds, recomputed from the JSON's raw fields
        gflops = 2 * DIGITS.macs() * r["batch"] / (r["denoiser_ms_median"] / 1e3) / 1e9
        assert r["gflops"] == pytest.approx(gflops, rel=1e-9)
        assert r["pct_of_peak"] == pytest.approx(100 * gflops / peaks[r["peak_key"]]["gflops"], rel=1e-9)
        assert r["peak_key"] == "fp32" and r["precision"] == "fp32"
        base = next(b for b in rows if b["baseline"] and b["batch"] == r["batch"])
        assert r["speedup_vs_torch_fp32"] == pytest.approx(base["denoiser_ms_median"] / r["denoiser_ms_median"])
        # end to end: 2 steps -> 2 denoiser calls of 2x batch rows (cfg 4 doubles the batch)
        assert r["e2e_denoiser_calls"] == 2 and r["e2e_denoiser_rows"] == 2 * 2 * r["batch"]
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["e2e_s"])
        assert 0 <= r["sampler_overhead_pct"] <= 100
        assert r["e2e_denoiser_s"] <= r["e2e_s"]
        assert r["sampler_overhead_pct"] == pytest.approx(100 * (r["e2e_s"] - r["e2e_denoiser_s"]) / r["e2e_s"])
        assert 10 < r["peak_rss_mb"] < 64 * 1024 and r["output_finite"]
        if r["backend"] == "torch":
            assert r["artifact_bytes"] == art["ckpt"].stat().st_size
        else:
            assert r["artifact_bytes"] == on_disk
    m = res["machine"]
    assert m["cpu"] and isinstance(m["flags"], list) and "onnxruntime" in m["versions"]


def test_bench_csv_plot_and_table(bench_run, capsys):
    rows = bench_run["result"]["rows"]
    with open(bench_run["csv"]) as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(rows)
    for line, r in zip(lines, rows, strict=True):
        assert line["target"] == r["target"] and int(line["batch"]) == r["batch"]
        assert float(line["gflops"]) == pytest.approx(r["gflops"])
        assert float(line["denoiser_ms_median"]) == pytest.approx(r["denoiser_ms_median"])
    from PIL import Image

    png = bench_run["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.size[0] > 600 and im.size[1] > 300
    from ditdeploy.bench.report import format_table

    table = format_table(bench_run["result"])
    assert "ms/call" in table and "GFLOP/s" in table and "x torch" in table
    for t in ("torch eager", "onnxruntime", "openvino"):
        assert t in table
    assert len(table.splitlines()) == 3 + len(rows)


def test_bench_is_torch_free_on_onnx(art, tmp_path):
    d = tmp_path / "block"
    d.mkdir()
    (d / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        for _m in ("torch", "torchvision", "diffusers"):
            sys.modules[_m] = None
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(d), os.environ.get("PYTHONPATH", "")])}
    js = tmp_path / "b.json"
    p = subprocess.run([sys.executable, "-m", "ditdeploy", "bench", "--engine", str(art["onnx"]), "--backends",
                        "onnxruntime", "--batch-sizes", "2", "--repeats", "2", "--warmup", "1", "--steps", "2",
                        "--probe-size", "128", "--json", str(js)], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr
    res = json.loads(js.read_text())
    assert [r["target"] for r in res["rows"]] == ["onnxruntime"] and not res["errors"]
    assert res["rows"][0]["speedup_vs_torch_fp32"] is None
    assert "torch fp32" not in res["peaks"]["fp32"]["probes"]


def test_matmul_peak_probe_measures_each_precision():
    pytest.importorskip("openvino")
    from ditdeploy.bench.machine import matmul_peak, peak_for

    p = matmul_peak("fp32", n=128, repeats=1)
    assert p["n"] == 128 and p["gflops"] == max(p["probes"].values()) > 0
    assert {"numpy fp32", "openvino f32"} <= set(p["probes"])
    b = matmul_peak("bf16", n=128, repeats=1)
    assert "openvino bf16" in b["probes"]
    assert peak_for("fp16") == "fp32" and peak_for("bf16") == "bf16" and peak_for("int8") == "int8"
    with pytest.raises(ValueError):
        matmul_peak("fp8")


def test_bench_bad_arguments(art):
    p = subprocess.run([sys.executable, "-m", "ditdeploy", "bench", "--engine", str(art["onnx"]), "--batch-sizes", "1,x"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 2 and "--batch-sizes" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run([sys.executable, "-m", "ditdeploy", "bench", "--engine", str(art["onnx"]), "--backends",
                        "nope"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 2 and "unknown backend" in p.stderr
