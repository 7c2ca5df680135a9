"""AOTInductor ``.pt2`` vs ONNX Runtime fp32 per denoiser call on this CPU (XL/2 256 by default, random weights).

Both artifacts come from the real CLI in child processes (same seed -> same weights): ``ditdeploy export --model V
--random-weights --out v.onnx`` and ``... --fmt aoti --out v.pt2`` (compile time and peak RSS from its manifest).
Then, in this process, both are loaded through ``ditdeploy.runtimes.load`` (what ``ditdeploy sample`` runs) and called
alternately on the same inputs (x ~ N(0,1), t spread over 0..999, half the rows the null class) ``--repeats`` times
per batch after a warm-up: machine load hits both sides of each ratio alike. Wall medians/minima and CPU seconds per
call are reported with the 1-minute load average; rel-L2 of the .pt2 output vs the ORT output on the same inputs.

Run once, by hand (not a test: the XL/2 compile takes minutes and several GB):
``python -m experiments.aoti_cpu [--variant XL/2] [--batches 2 8] [--repeats 5] [--work DIR]``; results are
written to ``bench/results/aoti_cpu.json`` with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the aoti runtime sets it (sleeping, not spinning, threads)


def _export(variant: str, out: Path, extra: list[str]) -> dict[str, Any]:
    """``ditdeploy export`` in a child process (its memory is returned to the OS); the artifact's manifest."""
    if not out.exists():
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "ditdeploy", "export", "--model", variant, "--random-weights", "--out", str(out),
               *extra]
        subprocess.run(cmd, check=True)
        print(f"exported {out.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(out.with_name(out.name + ".json").read_text())


def _inputs(cfg: Any, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
    t = np.rint(np.linspace(0, 999, n)).astype(np.int64)
    y = rng.integers(0, cfg.num_classes, n).astype(np.int64)
    y[n // 2:] = cfg.num_classes
    return x, t, y


def _timed(fn: Any, args: tuple) -> tuple[float, float, np.ndarray]:
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - w, time.process_time() - c, out


def compare(onnx_path: Path, pt2_path: Path, batches: list[int], repeats: int, warmup: int) -> list[dict[str, Any]]:
    """Interleaved per-call timing of the two artifacts; one row per batch size."""
    from ditdeploy.runtimes import load

    ort, aoti = load(onnx_path), load(pt2_path)
    rows = []
    for n in batches:
        args = _inputs(ort.config, n)
        for _ in range(warmup):
            ort(*args)
            aoti(*args)
        la0 = os.getloadavg()[0]
        times: dict[str, list[tuple[float, float]]] = {"ort": [], "aoti": []}
        for _ in range(repeats):
            w, c, ref = _timed(ort, args)
            times["ort"].append((w, c))
            w, c, got = _timed(aoti, args)
            times["aoti"].append((w, c))
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        row: dict[str, Any] = {"batch": n, "repeats": repeats, "load_avg_1m": [round(la0, 2),
                                                                               round(os.getloadavg()[0], 2)],
                               "rel_l2_aoti_vs_ort": rel}
        for k, v in times.items():
            row[k] = {"wall_median_s": statistics.median(w for w, _ in v), "wall_min_s": min(w for w, _ in v),
                      "cpu_median_s": statistics.median(c for _, c in v)}
        row["speedup_wall_median"] = row["ort"]["wall_median_s"] / row["aoti"]["wall_median_s"]
        row["speedup_cpu_median"] = row["ort"]["cpu_median_s"] / row["aoti"]["cpu_median_s"]
        rows.append(row)
        print(f"batch {n}: ORT {row['ort']['wall_median_s'] * 1e3:.0f} ms, .pt2 {row['aoti']['wall_median_s'] * 1e3:.0f}"
              f" ms (x{row['speedup_wall_median']:.2f} wall, x{row['speedup_cpu_median']:.2f} CPU), rel-L2 {rel:.2e},"
              f" load {row['load_avg_1m']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="XL/2")
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ditdeploy-aoti-bench"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "bench" / "results" / "aoti_cpu.json")
    a = ap.parse_args(argv)
    from ditdeploy.bench.machine import machine_info

    a.work.mkdir(parents=True, exist_ok=True)
    slug = a.variant.lower().replace("/", "")
    onnx_m = _export(a.variant, a.work / f"{slug}.onnx", [])
    pt2_m = _export(a.variant, a.work / f"{slug}.pt2", ["--fmt", "aoti"])
    rows = compare(a.work / f"{slug}.onnx", a.work / f"{slug}.pt2", a.batches, a.repeats, a.warmup)
    result = {
        "what": f"{a.variant} 256 random weights: AOTInductor .pt2 fp32 vs ONNX Runtime fp32, per denoiser call, "
                "interleaved on the same inputs",
        "machine": machine_info(),
        "note": "2 vCPU shared with other work while measured (see load_avg_1m): ratios of interleaved calls and "
                "CPU seconds are the comparable numbers, not absolute times",
        "pt2": {k: pt2_m.get(k) for k in ("compile_seconds", "export_seconds", "peak_rss_bytes", "parity", "torch")},
        "onnx": {k: onnx_m.get(k) for k in ("export_seconds", "peak_rss_bytes")},
        "rows": rows,
        "command": "python -m experiments.aoti_cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
