"""bench/gpu_engines on a CPU: the plan (dry run) and the tiny digits run of the CPU-testable sections. Every derived
number is recomputed from the JSON's raw fields; parity values are real (bf16/fp16 autocast vs fp32 eager).
The CUDA-graph, AOTI-on-GPU, FP8 and TensorRT rows need the device run (experiments/gpu_run.sh engines)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")

from ditdeploy.config.variants import DIGITS  # noqa: E402
from experiments.gpu_engines import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_writes_the_plan(tmp_path):
    main(["--out", str(tmp_path), "--dry-run"])
    d = json.loads((tmp_path / "gpu_engines.json").read_text())
    st = d["settings"]
    assert d["dry_run"] is True and st["variant"] == "XL/2" and st["batches"] == [2, 8, 32]
    assert st["e2e_steps"] == 50 and st["e2e_images"] == 8 and st["cfg_scale"] == 4.0
    assert st["tensorrt_importable"] is (importlib.util.find_spec("tensorrt") is not None)
    assert "rows" not in d


def test_gpu_run_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "experiments" / "gpu_run.sh")]).returncode == 0


def test_tiny_cpu_run(tmp_path):
    main(["--out", str(tmp_path), "--device", "cpu", "--tiny", "--sections", "eager,e2e,tensorrt"])
    d = json.loads((tmp_path / "gpu_engines.json").read_text())
    assert not [k for k in d["errors"] if "." not in k], d["errors"]
    macs = DIGITS.macs()
    assert d["model"]["macs_per_image"] == macs
    peak = d["bf16_matmul_peak"]["tflops"]
    assert peak > 0
    for prec, rel in (("fp16", 2e-3), ("bf16", 2e-2)):  # fp16: 10-bit mantissa, bf16: 7-bit
        r = d["rows"][f"eager_{prec}/b2"]
        p = r["parity_vs_fp32_eager"]
        assert 0 < p["rel_l2"] < rel and p["cosine"] > 0.999 and p["finite"], (prec, p)
        tflops = 2 * macs * 2 / (r["median_ms"] / 1e3) / 1e12
        assert r["tflops"] == pytest.approx(tflops, rel=1e-3, abs=1e-6)
        assert r["pct_of_bf16_peak"] == pytest.approx(100 * r["tflops"] / peak, rel=1e-2, abs=0.005)  # 2 decimals
    e = d["e2e"]
    assert e["eager_fp32"]["denoiser_calls"] == 3 and e["eager_fp32"]["x0_finite"]
    fast = next(k for k in e if k != "eager_fp32")
    assert e[fast]["x0_vs_fp32_eager"]["cosine"] > 0.999
    if importlib.util.find_spec("tensorrt") is None:
        assert "not importable" in d["notes"]["tensorrt_fp16"]
    assert fast == "eager_bf16"  # no AOTI section in this run
    from experiments.gpu_engines import summarize

    md = summarize(d)
    r = d["rows"]["eager_bf16/b2"]
    assert f"| eager_bf16 | 2 | {r['median_ms']:.3f} |" in md and "| eager_fp32 | 3 | 2 |" in md


@pytest.mark.slow
def test_tiny_cpu_aoti_rows(tmp_path):
    """AOTI bf16 package of the digits model on the CPU (~1 CPU-minute compile); fp8 said not measurable here."""
    main(["--out", str(tmp_path), "--device", "cpu", "--tiny", "--sections", "aoti,e2e", "--aoti-precisions",
          "bf16,fp8"])
    d = json.loads((tmp_path / "gpu_engines.json").read_text())
    assert not [k for k in d["errors"] if "." not in k], d["errors"]
    if importlib.util.find_spec("ditdeploy.export.aoti") is None:
        assert d["notes"]["aoti_bf16"].startswith("HOOK")
        return
    p = d["rows"]["aoti_bf16/b2"]["parity_vs_fp32_eager"]
    assert p["rel_l2"] < 2e-2 and p["cosine"] > 0.999
    assert "CUDA device" in d["notes"]["aoti_bf16_graph"] and "FP8 tensor cores" in d["notes"]["aoti_fp8"]
    assert d["e2e"]["aoti_bf16"]["x0_vs_fp32_eager"]["cosine"] > 0.99


def test_first_plan_dry_run(tmp_path):
    """`gpu_run.sh first`: eager bf16, AOTI bf16 at b2/b32 plain then as graphs, FP8 at b32 (no graph), nothing else."""
    main(["--out", str(tmp_path), "--dry-run", "--plan", "first"])
    st = json.loads((tmp_path / "gpu_engines.json").read_text())["settings"]
    assert st["plan"] == "first" and st["variant"] == "XL/2" and st["batches"] == [2, 32]
    assert st["sections"] == ["eager", "aoti"] and st["eager_precisions"] == ["bf16"]
    assert st["aoti_precisions"] == ["bf16", "fp8"]
    assert st["aoti"] == {"bf16": {"batches": [2, 32], "graph_batches": [2, 32]},
                          "fp8": {"batches": [32], "graph_batches": []}}


def _rows(tmp_path, batches):
    import torch

    from experiments.gpu_engines import Rows, _refs
    from experiments.gpu_torch import Recorder, random_copy

    model = random_copy("digits", 256, 0).eval()
    rec = Recorder(tmp_path / "r.json", {})
    return Rows(rec, model.config, torch.device("cpu"), None, _refs(model, batches, torch.device("cpu"), 0), 0, 1), model


def test_failed_graph_capture_keeps_the_other_rows(tmp_path):
    """Issue #21 defect 1, second half: a CUDA-graph capture that fails (here: no CUDA at all, a real failure of
    ``cuda_graphed``) is its own row's error; the plain rows at every batch and the later graph rows still run."""
    from experiments.gpu_engines import measure_package

    rows, model = _rows(tmp_path, [1, 2])
    measure_package(rows, "eager_fp32", model, [1, 2], [1, 2], model.config, 0)
    d = json.loads(rows.rec.path.read_text())["rows"]
    assert set(d) == {"eager_fp32/b1", "eager_fp32/b2", "eager_fp32_graph/b1", "eager_fp32_graph/b2"}
    for b in (1, 2):
        p = d[f"eager_fp32/b{b}"]["parity_vs_fp32_eager"]
        assert p["rel_l2"] == 0.0 and p["cosine"] == pytest.approx(1.0)  # the reference itself
        assert "error" in d[f"eager_fp32_graph/b{b}"]


def test_no_cuda_toolkit_skips_every_aoti_row(tmp_path):
    """Issue #21 defect 3: on CUDA without a toolkit the AOTI rows are skipped with the one-line reason."""
    from ditdeploy.runtimes.torch_env import find_cuda_toolkit
    from experiments.gpu_engines import aoti_skipped

    rows, _ = _rows(tmp_path, [1])
    nowhere = {"PATH": str(tmp_path / "bin")}
    assert aoti_skipped(rows, "cuda", ["bf16", "fp8"],
                        toolkit=lambda: find_cuda_toolkit(nowhere, default_home=str(tmp_path / "cuda")))
    notes = json.loads(rows.rec.path.read_text())["notes"]
    assert set(notes) == {"aoti_bf16", "aoti_bf16_graph", "aoti_fp8", "aoti_fp8_graph"}
    line = rows.rec.data["cuda_toolkit"]
    assert "\n" not in line and line.startswith("no CUDA toolkit") and "CUDA_HOME" in line
    assert all(n == f"skipped: {line}" for n in notes.values())
    assert not aoti_skipped(rows, "cpu", ["bf16"])  # a CPU package needs no toolkit
