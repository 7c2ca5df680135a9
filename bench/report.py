"""Benchmark output: an Ultralytics-style table for the terminal, CSV, JSON and a PNG plot (matplotlib, lazy)."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

COLUMNS: list[tuple[str, str, str]] = [
    # (header, row key, format)
    ("Target", "target", "s"),
    ("Precision", "precision", "s"),
    ("Batch", "batch", "d"),
    ("Size (MB)", "size_mb", ".1f"),
    ("ms/call", "denoiser_ms_median", ".2f"),
    ("p90 ms", "denoiser_ms_p90", ".2f"),
    ("img/s e2e", "images_per_s", ".3g"),
    ("Sampler %", "sampler_overhead_pct", ".2f"),
    ("RSS (MB)", "peak_rss_mb", ".0f"),
    ("GFLOP/s", "gflops", ".1f"),
    ("% peak", "pct_of_peak", ".0f"),
    ("x torch", "speedup_vs_torch_fp32", ".2f"),
]

CSV_KEYS = ["target", "backend", "runtime", "precision", "variant", "input_size", "batch", "artifact_bytes",
            "denoiser_ms_median", "denoiser_ms_p90", "denoiser_ms_min", "repeats", "warmup", "e2e_s", "images_per_s",
            "e2e_denoiser_s", "e2e_decoder_s", "sampler_overhead_pct", "steps", "cfg_scale", "sampler",
            "peak_rss_mb", "gpu_mem_mb", "macs_per_sample", "flops_per_call", "gflops", "peak_key", "peak_gflops",
            "pct_of_peak", "torch_fp32_ms", "speedup_vs_torch_fp32", "output_finite"]


def _cell(row: dict[str, Any], key: str, spec: str) -> str:
    if key == "size_mb":
        v = row.get("artifact_bytes")
        v = None if v is None else v / 1e6
    else:
        v = row.get(key)
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def _ok_mark() -> tuple[str, str]:
    enc = (getattr(sys.stdout, "encoding", None) or "").lower()
    return ("✅", "❌") if "utf" in enc else ("ok", "ERR")


def format_table(result: dict[str, Any]) -> str:
    """Ultralytics-style benchmark table: one line per (target, batch), failed targets listed with their error."""
    ok, bad = _ok_mark()
    headers = ["", "Status"] + [h for h, _, _ in COLUMNS]
    lines_data = []
    for i, r in enumerate(result["rows"]):
        status = ok if r.get("output_finite", True) else f"{bad} NaN"
        lines_data.append([str(i), status] + [_cell(r, k, f) for _, k, f in COLUMNS])
    for e in result.get("errors", []):
        lines_data.append([str(len(lines_data)), bad, e["target"]] + ["-"] * (len(COLUMNS) - 1))
    widths = [max(len(h), *(len(row[j]) for row in lines_data)) if lines_data else len(h)
              for j, h in enumerate(headers)]
    out = io.StringIO()
    m = result.get("machine", {})
    pk = result.get("peaks", {})
    peaks = ", ".join(f"{k} {v['gflops']:.0f} GFLOP/s ({v['probe']})" for k, v in pk.items() if v.get("gflops"))
    s = result.get("settings", {})
    variants = sorted({f"{r['variant']} ({r['input_size']}x{r['input_size']})" for r in result["rows"]})
    out.write(f"Benchmarks for {', '.join(variants) or '-'} on {m.get('cpu', '?')} "
              f"({m.get('usable_cpus', m.get('logical_cpus', '?'))} cpus, load {m.get('load_avg_1_5_15', '?')})\n")
    out.write(f"e2e: {s.get('sampler')} {s.get('steps')} steps, cfg {s.get('cfg_scale')}; per call: median of "
              f"{s.get('repeats')} after {s.get('warmup')} warm-up; matmul peak: {peaks or 'not probed'}\n")
    out.write("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)) + "\n")
    for row in lines_data:
        out.write("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + "\n")
    for e in result.get("errors", []):
        out.write(f"{bad} {e['target']}: {e['error']}\n")
    return out.getvalue().rstrip("\n")


def write_csv(result: dict[str, Any], path: str | Path) -> None:
    """One CSV line per row with the inputs of every derived number (atomic write)."""
    from ditdeploy.artifact.files import write_bytes_atomic

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_KEYS, extrasaction="ignore")
    w.writeheader()
    for r in result["rows"]:
        w.writerow({k: r.get(k) for k in CSV_KEYS})
    write_bytes_atomic(path, buf.getvalue().encode())


def write_plot(result: dict[str, Any], path: str | Path) -> None:
    """PNG: denoiser ms/call per batch (median, whisker to p90) and end-to-end images/s, one bar per target."""
    from ditdeploy.errors import require

    mpl = require("matplotlib", "bench", "the --plot option")
    mpl.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ditdeploy.artifact.files import atomic_path

    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    targets = list(dict.fromkeys(f"{r['target']} [{r['precision']}]" for r in rows))
    has_e2e = any(r.get("images_per_s") for r in rows)
    fig, axes = plt.subplots(1, 2 if has_e2e else 1, figsize=(12 if has_e2e else 7, 4.5), squeeze=False)
    width = 0.8 / max(1, len(targets))
    xs = np.arange(len(batches))
    for panel, (key, ylabel) in enumerate([("denoiser_ms_median", "denoiser ms / call (median, bar to p90)"),
                                           ("images_per_s", "end-to-end images / s")][: 2 if has_e2e else 1]):
        ax = axes[0][panel]
        for i, tname in enumerate(targets):
            vals, err = [], []
            for b in batches:
                r = next((r for r in rows if f"{r['target']} [{r['precision']}]" == tname and r["batch"] == b), None)
                v = r.get(key) if r else None
                vals.append(v if v is not None else np.nan)
                err.append((r["denoiser_ms_p90"] - r["denoiser_ms_median"]) if (r and panel == 0) else 0.0)
            ax.bar(xs + (i - (len(targets) - 1) / 2) * width, vals, width, label=tname,
                   yerr=[np.zeros(len(err)), err] if panel == 0 else None, capsize=2)
        ax.set_xticks(xs, [f"batch {b}" for b in batches])
        ax.set_ylabel(ylabel)
        if panel == 0:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    m = result.get("machine", {})
    variants = ", ".join(sorted({r["variant"] for r in rows}))
    fig.suptitle(f"ditdeploy bench: {variants} on {m.get('cpu', '?')} ({m.get('usable_cpus', '?')} cpus)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
