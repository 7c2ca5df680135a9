"""FID / IS / precision / recall of the shipped digits model's deployment variants, with the offline digits extractor.

Every variant samples the same images (same seeds: image i's noise comes from (seed, i)), 100 per class, DDIM 50,
cfg 4 (``ditdeploy sample``'s defaults) unless the row says otherwise, through the library (``generate``); artifacts
come from the CLI (``ditdeploy export`` / ``ditdeploy calibrate``). Each row reports FID vs the 1797 real digits,
the delta to the torch fp32 row, and FID of the variant's samples against the torch fp32 samples themselves.
Baselines: real half A vs half B (the floor at this sample size), real half A vs all real, uniform noise.

Run: ``python -m experiments.fid_digits [--work DIR] [--n-per-class 100] [--json bench/results/fid_digits.json]
[--only NAME,...]``. The artifacts and npz files stay in ``--work``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ASSETS = Path(__file__).resolve().parent.parent / "ditdeploy" / "assets"

# name -> (artifact key, backend, backend options, extra request fields, what it is)
VARIANTS: dict[str, tuple[str, str, dict, dict, str]] = {
    "torch-fp32": ("torch", "torch", {}, {}, "PyTorch fp32 (reference)"),
    "ort-fp32": ("onnx", "onnxruntime", {}, {}, "ONNX Runtime fp32 (shipped digits.onnx)"),
    "ort-int8-dynamic": ("int8d", "onnxruntime", {}, {}, "ONNX Runtime INT8 dynamic"),
    "ort-int8-static": ("int8s", "onnxruntime", {}, {}, "ONNX Runtime INT8 static Q/DQ (calibrated)"),
    "ort-fp16": ("fp16", "onnxruntime", {}, {}, "ONNX Runtime fp16 export"),
    "ov-bf16": ("onnx", "openvino", {"precision_hint": "bf16"}, {}, "OpenVINO bf16 hint"),
    "cfg-interval": ("onnx", "onnxruntime", {}, {"cfg_interval": [150, 750]},
                     "ORT fp32, guidance only at t in 150..750"),
    "cfg-1": ("onnx", "onnxruntime", {}, {"cfg_scale": 1.0}, "ORT fp32, no guidance (cfg 1)"),
    "cfg-2": ("onnx", "onnxruntime", {}, {"cfg_scale": 2.0}, "ORT fp32, cfg 2"),
    "ov-int8-static": ("int8s", "openvino", {}, {}, "OpenVINO on the static Q/DQ artifact"),
    "less-work": ("cache", "onnxruntime", {}, {"cfg_interval": [150, 750], "cache_interval": 2},
                  "ORT fp32 two-graph, interval 150..750 + cache 2 (docs/less-work.md's recommendation)"),
    "cache-2": ("cache", "onnxruntime", {}, {"cache_interval": 2}, "ORT fp32 two-graph, feature reuse every 2nd step"),
    "ov-fp32": ("onnx", "openvino", {}, {}, "OpenVINO fp32"),
    "seed-1": ("onnx", "onnxruntime", {}, {"seed": 1}, "ORT fp32, other seeds (seed 1): the seed-to-seed spread"),
}


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ditdeploy", *args], check=True)


def artifacts(work: Path, need: set[str]) -> dict[str, Path]:
    """The artifacts the variants need, made with the CLI (kept in ``work`` between runs)."""
    arts = {"torch": ASSETS / "digits.safetensors", "onnx": ASSETS / "digits.onnx"}
    if "fp16" in need and not (work / "digits-fp16.onnx").exists():
        _cli("export", "--model", "digits", "--precision", "fp16", "--out", str(work / "digits-fp16.onnx"))
    if "int8d" in need and not (work / "digits-int8d.onnx").exists():
        _cli("export", "--model", "digits", "--precision", "int8", "--int8-mode", "dynamic", "--out",
             str(work / "digits-int8d.onnx"))
    if "int8s" in need and not (work / "digits-int8s.onnx").exists():
        if not (work / "calib.npz").exists():
            _cli("calibrate", "--engine", str(arts["onnx"]), "--steps", "50", "--out", str(work / "calib.npz"))
        _cli("export", "--model", "digits", "--precision", "int8", "--calibration", str(work / "calib.npz"),
             "--out", str(work / "digits-int8s.onnx"))
    if "cache" in need and not (work / "digits-cache.onnx").exists():
        _cli("export", "--model", "digits", "--cache-graphs", "--out", str(work / "digits-cache.onnx"))
    arts.update(cache=work / "digits-cache.onnx", fp16=work / "digits-fp16.onnx", int8d=work / "digits-int8d.onnx", int8s=work / "digits-int8s.onnx")
    return arts


def sample_variant(name: str, arts: dict[str, Path], work: Path, n_per_class: int) -> tuple[Path, float | None,
                                                                                         dict]:
    """Sample ``name`` into ``work/<name>.npz`` (skipped when present); returns (npz, CPU seconds or None, work)."""
    from ditdeploy.run.generation import SampleRequest, generate

    key, backend, opts, extra, _ = VARIANTS[name]
    npz = work / f"{name}.npz"
    if npz.exists():  # reused from an earlier run in the same --work folder
        return npz, None, {}
    # one intra-op thread: on the shared 2-core machine a second spinning thread costs more than it gives
    req = SampleRequest(engine=arts[key], backend=backend, options={"threads": 1, **opts}, num_per_label=n_per_class,
                        out=None, npz=npz, **extra)
    t0 = time.process_time()
    res = generate(req)
    return npz, time.process_time() - t0, dict(res.work)


def baselines(work: Path) -> dict[str, Path]:
    """Real halves (a seed-1 permutation) and uniform noise, as npz files."""
    from ditdeploy.fid.digits import real_digits_u8
    from ditdeploy.run.images import save_npz

    u8, y = real_digits_u8()
    perm = np.random.default_rng(1).permutation(len(u8))
    h = len(u8) // 2
    out = {"real-a": work / "real-a.npz", "real-b": work / "real-b.npz", "noise": work / "noise.npz"}
    save_npz(out["real-a"], u8[perm[:h]], y[perm[:h]])
    save_npz(out["real-b"], u8[perm[h:]], y[perm[h:]])
    save_npz(out["noise"], np.random.default_rng(0).integers(0, 256, (1000, 8, 8, 1), dtype=np.uint8), np.zeros(1000))
    return out


def fid(samples: Path, ref: str | Path) -> dict[str, Any]:
    """Scored with the digits extractor, against the real digits or another npz."""
    from ditdeploy.fid import FidRequest, evaluate

    return evaluate(FidRequest(samples=samples, ref=ref, extractor="digits", progress=False))


def run(work: Path, n_per_class: int, only: list[str] | None, partial: Path | None = None) -> dict[str, Any]:
    """All rows; with ``partial``, the rows so far are written there after each variant."""
    names = only or list(VARIANTS)
    work.mkdir(parents=True, exist_ok=True)
    arts = artifacts(work, {VARIANTS[n][0] for n in names})
    base = baselines(work)
    rows: dict[str, Any] = {
        "real A vs real B": fid(base["real-a"], base["real-b"])["metrics"],
        "real A vs all real": fid(base["real-a"], "digits")["metrics"],
        "uniform noise": fid(base["noise"], "digits")["metrics"],
    }
    ref_npz = sample_variant("torch-fp32", arts, work, n_per_class)[0]
    for name in names:
        npz, cpu_s, work_sum = sample_variant(name, arts, work, n_per_class)
        rep = fid(npz, "digits")
        rows[name] = {**rep["metrics"], "what": VARIANTS[name][4], "sampling_cpu_s": cpu_s,
                      "fid_vs_torch_fp32_samples": fid(npz, ref_npz)["metrics"]["fid"], "work": work_sum}
        print(f"{name}: FID {rep['metrics']['fid']:.4f}", flush=True)
        if partial is not None:
            from ditdeploy.artifact.files import write_json_atomic

            write_json_atomic(partial, {"rows": rows, "partial": True})
    t = rows["torch-fp32"]["fid"] if "torch-fp32" in rows else None
    for name in names:
        rows[name]["fid_delta_vs_torch_fp32"] = rows[name]["fid"] - t if t is not None else None
    ext = fid(base["real-a"], "digits")["extractor"]
    return {"extractor": ext, "samples_per_variant": 10 * n_per_class, "sampler": "ddim 50, cfg 4 unless noted",
            "rows": rows}


def table(res: dict[str, Any]) -> str:
    """The README / docs table (markdown): baselines first, then the variants."""
    lines = ["| samples | FID vs real | Δ vs torch fp32 | FID vs torch fp32 samples | IS | precision | recall |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        variant = "fid_vs_torch_fp32_samples" in r
        d = r.get("fid_delta_vs_torch_fp32")
        cells = [r.get("what", name), f"{r['fid']:.3f}", f"{d:+.3f}" if variant and d is not None else "",
                 f"{r['fid_vs_torch_fp32_samples']:.4f}" if variant else "", f"{r['inception_score']:.2f}",
                 f"{r['precision']:.3f}", f"{r['recall']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="fid_digits_work")
    ap.add_argument("--n-per-class", type=int, default=100)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from ditdeploy.bench.machine import machine_info

    res = run(Path(a.work), a.n_per_class, a.only.split(",") if a.only else None,
              Path(a.json + ".partial") if a.json else None)
    res["machine"] = machine_info()
    print(table(res))
    if a.json:
        from ditdeploy.artifact.files import write_json_atomic

        write_json_atomic(a.json, res)
        Path(a.json + ".partial").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
