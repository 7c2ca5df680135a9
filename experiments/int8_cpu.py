"""INT8 vs fp32 per denoiser call on ONNX Runtime CPU: S/2, B/2, XL/2 (random weights) at batch 2 and 8.

For each variant the fp32 ONNX is exported (``ditdeploy.export.onnx.export_denoiser_onnx``, random weights with the
adaLN/final layers filled), a small calibration set is captured from it with the real sampler (DDIM, cfg 4, both
halves), and INT8 artifacts are built with ``ditdeploy.calibration.quantize.quantize_int8``:

- ``static-int8``: explicit Q/DQ, int8 symmetric activations (the TensorRT-ready artifact);
- ``static-uint8+fuse``: Q/DQ with uint8 asymmetric activations and ORT's CPU fusions (``calibration.fusions``:
  tanh-GELU -> FastGelu, attention core -> MultiHeadAttention; CPU only);
- ``dynamic``: ``quantize_dynamic`` per-channel on the token GEMMs (exclusions honoured);
- ``dynamic+fuse``: the same with the ORT CPU fusions;
- optional ``dynamic+fuse+adaln`` (``--with-adaln``): also the adaLN modulation GEMMs in dynamic int8 (the
  sensitive layers docs/reference.md §3 says to keep in high precision: a speed data point, not a recommendation).

The fp32 reference is the exported fp32 ONNX on ORT (and ``fp32+fuse``: the same graph with the same fusions, so the
gain of the fusions alone is visible; ``--openvino`` adds fp32 and the static Q/DQ artifact on OpenVINO CPU). Every artifact is loaded through ``ditdeploy.runtimes.load`` (ORT_ENABLE_ALL,
intra-op threads = physical cores, sequential), exactly what ``ditdeploy sample`` runs. Timing: after warm-up, each
artifact is called alternately with the fp32 model ``--repeats`` times on the same inputs (only two models in memory;
machine load hits both sides of each ratio alike); medians and minima per call are reported with the 1-minute load
average. Cosine / rel-L2 of each output vs the fp32 output on the same inputs (x from the held-out validation set, t
spread over the trajectory, both CFG halves).

Run: ``python -m experiments.int8_cpu --variants S/2 B/2 [--work DIR] [--repeats 7]``; XL/2 is heavy (2.7 GB of
weights, ~7 GB peak RSS during export): ``--variants XL/2`` once, on a quiet machine. Results are merged into
``bench/results/int8_cpu.json`` (one entry per variant) with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

QUANT_VARIANTS: dict[str, dict[str, Any]] = {
    "static-int8": dict(mode="static"),
    "static-uint8+fuse": dict(mode="static", activations="uint8", ort_fusions=True),
    "dynamic": dict(mode="dynamic", ort_fusions=False),
    "dynamic+fuse": dict(mode="dynamic", ort_fusions=True),
}
# placement / type investigation (``--investigate``): ORT's default Q/DQ on GEMM outputs (-> QLinearMatMul), and
# uint8 activations without the fusion
INVESTIGATE = {"static-int8-outq": dict(mode="static", quantize_outputs=True),
               "static-uint8": dict(mode="static", activations="uint8", ort_fusions=False),
               "static-int8-pertensor": dict(mode="static", per_channel=False)}
ADALN_VARIANT = {"dynamic+fuse+adaln": dict(mode="dynamic", ort_fusions=True,
                                            exclude=["embedder", "final", "attention", "other"])}
GOAL_SPEEDUP = 3.0
GOAL_COSINE = 0.999


def _slug(v: str) -> str:
    return v.lower().replace("/", "")


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        return None


def build_artifacts(variant: str, work: Path, *, calib_samples: int, max_inputs: int, with_adaln: bool,
                    with_fp32_fuse: bool = True, seed: int = 0, investigate: bool = False) -> dict[str, Any]:
    """Export fp32, capture calibration, quantize every variant (skipping files that already exist)."""
    from ditdeploy.calibration.capture import CaptureSettings, capture_calibration_set
    from ditdeploy.calibration.quantize import quantize_int8
    from ditdeploy.runtimes import load

    work.mkdir(parents=True, exist_ok=True)
    s = _slug(variant)
    fp32 = work / f"{s}-fp32.onnx"
    info: dict[str, Any] = {"files": {}, "seconds": {}}
    if not fp32.exists():
        from ditdeploy.export.onnx import export_denoiser_onnx
        from ditdeploy.export.randomize import random_model

        t0 = time.perf_counter()
        m = export_denoiser_onnx(random_model(variant, seed=seed), fp32, verify=True)
        info["seconds"]["export_fp32"] = round(time.perf_counter() - t0, 1)
        info["export_parity_rel_l2"] = (m.get("parity") or {}).get("worst", {}).get("rel_l2")
        print(f"[{variant}] exported fp32 in {info['seconds']['export_fp32']} s", flush=True)
    info["files"]["fp32"] = fp32
    calib = work / f"{s}-calib.npz"
    if not calib.exists():
        t0 = time.perf_counter()
        capture_calibration_set(load(fp32), calib,
                                CaptureSettings(samples=calib_samples, steps=25, cfg_scale=4.0, batch_size=2,
                                                val_samples=1, seed=seed),
                                progress=sys.stderr.isatty())
        info["seconds"]["calibrate"] = round(time.perf_counter() - t0, 1)
        print(f"[{variant}] calibration set in {info['seconds']['calibrate']} s", flush=True)
    info["files"]["calibration"] = calib
    variants = dict(QUANT_VARIANTS)
    if with_adaln:
        variants.update(ADALN_VARIANT)
    if investigate:
        variants.update(INVESTIGATE)
    info["quantize"] = {}
    for name, kw in variants.items():
        out = work / f"{s}-{name.replace('+', '_')}.onnx"
        if not out.exists():
            t0 = time.perf_counter()
            m = quantize_int8(fp32, out, calib, max_inputs=max_inputs, batch_size=4, progress=sys.stderr.isatty(),
                              **kw)
            secs = round(time.perf_counter() - t0, 1)
            print(f"[{variant}] {name}: quantized in {secs} s ({m['int8']['quantized_nodes']} nodes, "
                  f"check cosine {m['parity']['per_call_cosine_min']:.5f})", flush=True)
            info["quantize"][name] = {"seconds": secs, "nodes": m["int8"]["quantized_nodes"],
                                      "excluded": m["int8"]["excluded_roles"], "fusions": m["int8"]["ort_fusions"]}
        info["files"][name] = out
    if with_fp32_fuse:
        fused = work / f"{s}-fp32_fuse.onnx"
        if not fused.exists():
            _fp32_fused(fp32, fused)
        info["files"]["fp32+fuse"] = fused
    return info


def _fp32_fused(src: Path, out: Path) -> None:
    """The fp32 graph with the same FastGelu fusion (graph-only copy beside the source: same external data)."""
    import onnx

    from ditdeploy.artifact.files import manifest_path, write_json_atomic
    from ditdeploy.artifact.manifest import load_manifest, make_manifest
    from ditdeploy.calibration.quantize import _load_small_external, ort_cpu_fusions

    graph = onnx.load(str(src), load_external_data=False)
    _load_small_external(graph, src.parent)
    model, _ = ort_cpu_fusions(graph)
    onnx.save(model, str(out))  # same directory, so the external data file of src resolves
    m = load_manifest(src)
    assert m is not None
    files = [out] + [src.parent / n for n in m["files"] if n.endswith(".data")]
    fields = {k: v for k, v in m.items() if k not in ("manifest_version", "artifact", "files", "tools")}
    write_json_atomic(manifest_path(out), make_manifest(out, files, **fields))


def _inputs(calib: Path, batch: int, cfg: Any, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``batch`` held-out inputs spread over the trajectory (validation set; repeated if it is small)."""
    from ditdeploy.calibration.capture import load_calibration

    cs = load_calibration(calib)
    v = cs.val if cs.val is not None else {"x": cs.x, "t": cs.t, "y": cs.y}
    order = np.argsort(v["t"])
    idx = order[np.round(np.linspace(0, len(order) - 1, batch)).astype(int)]
    return v["x"][idx], v["t"][idx], v["y"][idx]


def measure(files: dict[str, Path], calib: Path, batches: list[int], repeats: int, warmup: int = 1,
            threads: int | None = None) -> dict[str, Any]:
    """Median seconds per call of every artifact vs fp32, and cosine / rel-L2 vs fp32 on the same inputs.

    fp32 stays loaded; the other artifacts are loaded one at a time and called alternately with fp32 (``repeats``
    pairs), so only two models are in memory (XL/2: ~2.7 + ~1.6 GB) and load drift hits both sides of a ratio.
    """
    import gc

    from ditdeploy.proof import distances
    from ditdeploy.runtimes import load

    ref = load(files["fp32"], threads=threads)
    cfg = ref.config
    inputs = {b: _inputs(calib, b, cfg) for b in batches}
    ref_out = {}
    for b in batches:
        for _ in range(warmup):
            ref_out[b] = ref(*inputs[b])
    res: dict[str, Any] = {str(b): {"repeats": repeats, "t": inputs[b][1].tolist(), "y": inputs[b][2].tolist()}
                           for b in batches}
    for name, path in files.items():
        backend = name.rsplit("@", 1)[1] if "@" in name else None  # e.g. "static-int8@openvino"
        den = ref if name == "fp32" else load(path, threads=threads, backend=backend)
        for b in batches:
            x, t, y = inputs[b]
            for _ in range(warmup):
                out = den(x, t, y)
            t_ref: list[float] = []
            t_den: list[float] = []
            c_ref: list[float] = []
            c_den: list[float] = []
            la0 = _load_avg()
            for _ in range(repeats):
                c0, t0 = time.process_time(), time.perf_counter()
                ref(x, t, y)
                t_ref.append(time.perf_counter() - t0)
                c_ref.append(time.process_time() - c0)
                if den is not ref:
                    c0, t0 = time.process_time(), time.perf_counter()
                    den(x, t, y)
                    t_den.append(time.perf_counter() - t0)
                    c_den.append(time.process_time() - c0)
            t_den, c_den = (t_den or t_ref), (c_den or c_ref)
            med, med_ref = float(np.median(t_den)), float(np.median(t_ref))
            cpu, cpu_ref = float(np.median(c_den)), float(np.median(c_ref))
            row = {
                "median_s": round(med, 4), "min_s": round(min(t_den), 4),
                "fp32_median_s": round(med_ref, 4), "fp32_min_s": round(min(t_ref), 4),
                "speedup_vs_fp32": round(med_ref / med, 3),
                "speedup_vs_fp32_min": round(min(t_ref) / min(t_den), 3),
                # CPU seconds (all threads) per call: the work done, robust to waiting for a shared CPU
                "cpu_s": round(cpu, 4), "fp32_cpu_s": round(cpu_ref, 4),
                "speedup_vs_fp32_cpu": round(cpu_ref / cpu, 3),
                "cosine_vs_fp32": distances.cosine(out, ref_out[b]),
                "per_sample_cosine_min": min(distances.cosine(out[i], ref_out[b][i]) for i in range(b)),
                "rel_l2_vs_fp32": distances.rel_l2(out, ref_out[b]),
                "load_avg_1m": [la0, _load_avg()],
            }
            res[str(b)][name] = row
            print(f"  batch {b:2d} {name:22s} {med * 1e3:9.1f} ms (min {min(t_den) * 1e3:8.1f}) vs fp32 "
                  f"{med_ref * 1e3:9.1f} ms  x{row['speedup_vs_fp32']:5.2f} (min x{row['speedup_vs_fp32_min']:5.2f}, "
                  f"cpu x{row['speedup_vs_fp32_cpu']:5.2f})  cos {row['cosine_vs_fp32']:.6f} "
                  f"(min/sample {row['per_sample_cosine_min']:.6f})  load {row['load_avg_1m']}", flush=True)
        if den is not ref:
            del den
            gc.collect()
    return res


def _best(entry: dict[str, Any]) -> dict[str, Any]:
    """The fastest INT8 artifact meeting the cosine goal, per batch, by wall-clock median and by CPU time."""
    out = {}
    for b, row in entry["batches"].items():
        ok = {n: v for n, v in row.items() if isinstance(v, dict) and "median_s" in v
              and not n.startswith("fp32") and v["per_sample_cosine_min"] >= GOAL_COSINE}
        if not ok:
            continue
        res = {}
        for key in ("speedup_vs_fp32", "speedup_vs_fp32_min", "speedup_vs_fp32_cpu"):
            n = max(ok, key=lambda k, key=key: ok[k][key])
            res[key] = {"artifact": n, "speedup": ok[n][key], "meets_goal": ok[n][key] >= GOAL_SPEEDUP}
        out[b] = res
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["S/2", "B/2"])
    ap.add_argument("--batches", nargs="+", type=int, default=[2, 8])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--work", default=None, help="artifact folder (kept for reruns; default: a temp folder)")
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--max-inputs", type=int, default=64, help="calibration inputs used for the ranges")
    ap.add_argument("--with-adaln", action="store_true", help="also time dynamic int8 with adaLN quantized")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--build-only", action="store_true", help="prepare the artifacts in --work, measure nothing")
    ap.add_argument("--investigate", action="store_true",
                    help="also Q/DQ on GEMM outputs (QLinearMatMul), uint8 without fusion, per-tensor weights")
    ap.add_argument("--openvino", action="store_true",
                    help="also time the TensorRT-ready static Q/DQ artifact (and fp32) on OpenVINO CPU")
    ap.add_argument("--only", nargs="+", default=None, help="measure only these artifacts (fp32 is always the ref)")
    ap.add_argument("--json", default="bench/results/int8_cpu.json")
    a = ap.parse_args(argv)

    import tempfile

    from ditdeploy.artifact.files import write_json_atomic
    from ditdeploy.bench.machine import machine_info

    tmp = None
    if a.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="int8-cpu-")
        work = Path(tmp.name)
    else:
        work = Path(a.work)
    try:
        results = json.loads(Path(a.json).read_text()) if a.json and Path(a.json).exists() else {}
        results.setdefault("variants", {})
        for v in a.variants:
            print(f"== {v}", flush=True)
            info = build_artifacts(v, work, calib_samples=a.calib_samples, max_inputs=a.max_inputs,
                                   with_adaln=a.with_adaln, investigate=a.investigate)
            files = info.pop("files")
            calib = files.pop("calibration")
            if a.build_only:
                continue
            if a.openvino:
                files["fp32@openvino"] = files["fp32"]
                files["static-int8@openvino"] = files["static-int8"]
            order = ["fp32", "fp32+fuse"] + [k for k in files if k not in ("fp32", "fp32+fuse")]
            if a.only:
                order = ["fp32"] + [k for k in order if k in a.only and k != "fp32"]
            entry = {"batches": measure({k: files[k] for k in order if k in files}, calib, a.batches, a.repeats,
                                        threads=a.threads),
                     "build": info, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "fp32_bytes": sum(p.stat().st_size for p in work.glob(f"{_slug(v)}-fp32.onnx*"))}
            entry["best_int8"] = _best(entry)
            results["variants"][v] = entry
            results["machine"] = machine_info()
            results["goal"] = {"speedup_vs_ort_fp32": GOAL_SPEEDUP, "per_call_cosine": GOAL_COSINE,
                               "variant": "XL/2"}
            results["command"] = "python -m experiments.int8_cpu " + " ".join(argv or sys.argv[1:])
            if a.json:
                write_json_atomic(a.json, results)
                print(f"wrote {a.json}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
