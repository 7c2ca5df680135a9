"""The benchmark harness behind ``ditdeploy bench``: speed, memory and roofline per target and batch.

Per target (artifact x backend) and batch, it measures:

* denoiser latency per call: median and p90 over ``repeats`` timed calls after ``warmup`` untimed ones;
* end to end: one full sampling run (``ditdeploy.diffusion.sample``) of ``batch`` images with ``steps`` steps
  and guidance (denoiser batch 2x when cfg > 1), plus VAE decode when the artifact has a decoder: images/s and
  the sampler's overhead (wall time not spent inside denoiser or decoder calls) in %;
* peak RSS of the process (each target runs in its own subprocess, so the number is that target's), GPU memory
  when present, artifact size on disk;
* achieved GFLOP/s = 2 * DiTConfig.macs() * batch / median call time, and its % of this machine's measured
  matmul peak for the row's precision (``bench.machine.matmul_peak``);
* speed-up vs torch eager fp32, measured in the same run on the same config and batch (when torch is
  installed).

Results are plain dicts (``rows``) with every input to the derived numbers, so they can be recomputed from
JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.errors import DitDeployError
from ditdeploy.system.bounds import check_batch

RESULT_TAG = "DITDEPLOY_BENCH_RESULT "


@dataclass
class Target:
    """One thing to time: an artifact on a backend (with backend options), or torch eager from a checkpoint or
    from a bare config (random weights, for speed only)."""

    label: str
    backend: str
    path: str | None = None
    opts: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # torch random-weight baseline
    decoder: str | None = None
    baseline: bool = False  # the torch eager fp32 row the speed-ups are computed against
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the worker process

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


@dataclass
class Settings:
    batches: list[int]
    steps: int = 10
    repeats: int = 10
    warmup: int = 2
    cfg_scale: float = 4.0
    sampler: str = "ddim"
    seed: int = 0
    e2e: bool = True
    cfg_interval: list[int] | None = None  # guidance only at timesteps lo..hi in the end-to-end run
    cache_interval: int | None = None  # feature reuse in the end-to-end run (every N-th step full)

    def less_work(self) -> bool:
        """Whether a reduced-work option is set (only then do reports carry the less-work fields)."""
        return self.cfg_interval is not None or self.cache_interval is not None

    def report(self) -> dict[str, Any]:
        """The settings as reported: the less-work keys only when set, so default reports stay as before."""
        d = dataclasses.asdict(self)
        if not self.less_work():
            d.pop("cfg_interval")
            d.pop("cache_interval")
        return d


def parse_batches(spec: str, flag: str = "--batch-sizes") -> list[int]:
    """``"1,2,8"`` -> [1, 2, 8] (sorted, unique); a one-line DitDeployError naming ``flag`` otherwise."""
    try:
        out = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError as e:
        raise DitDeployError(f"{flag} takes comma-separated integers like 1,2,8, got {spec!r}") from e
    if not out or any(b < 1 for b in out):
        raise DitDeployError(f"{flag} needs positive sizes, got {spec!r}")
    check_batch(max(out), flag)
    return sorted(dict.fromkeys(out))


def default_backends(path: Path) -> list[str]:
    """The installed backends that read ``path``, the one its suffix selects first (``runtimes.registry``), plus
    OpenVINO's bf16 hint on CPUs with native bf16; torch for anything else."""
    from ditdeploy.runtimes.registry import get_backend, readers

    first, *rest = readers(path.suffix) or ["torch"]
    out = [first] + [b for b in rest if get_backend(b).installed()]
    if "openvino" in out and _cpu_has_bf16():
        out.insert(out.index("openvino") + 1, "openvino:bf16")
    return out


def _cpu_has_bf16() -> bool:
    from ditdeploy.bench.machine import cpu_flags

    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def parse_backend_spec(spec: str) -> tuple[str, dict[str, Any], str]:
    """``"openvino:bf16"`` -> ("openvino", {"precision_hint": "bf16"}, "openvino:bf16"); ``"name:key=value,..."`` sets
    backend options (checked against the backend's option set: a misspelt one is a one-line error); plain names pass
    through."""
    from ditdeploy.runtimes import backend_names, check_options
    from ditdeploy.runtimes.options import parse_value
    from ditdeploy.runtimes.registry import canonical

    name, _, arg = spec.partition(":")
    try:
        name = canonical(name)
    except DitDeployError:
        raise DitDeployError(f"unknown backend {spec!r}: choose from {', '.join(backend_names())} "
                             "(openvino:bf16 / openvino:f32 set OpenVINO's precision hint)") from None
    opts: dict[str, Any] = {}
    if "=" in arg:
        for item in arg.split(","):
            key, eq, val = item.partition("=")
            if not eq or not key.strip():
                raise DitDeployError(f"backend option {item!r} in {spec!r}: write KEY=VALUE (e.g. onnxruntime:threads=2)")
            opts[key.strip()] = parse_value(val)
        check_options(name, opts)
    elif arg:
        if name != "openvino":
            raise DitDeployError(f"backend option ':{arg}' is only understood for openvino (precision hint); "
                                 f"other options are KEY=VALUE (e.g. {name}:threads=2)")
        opts["precision_hint"] = arg
    return name, opts, (f"{name}:{arg}" if arg else name)


def artifact_bytes(path: str | None, manifest: dict[str, Any] | None) -> int | None:
    """Bytes on disk: the files the manifest lists (model + external data / .bin), else the file itself."""
    from ditdeploy.artifact.manifest import Manifest

    total = Manifest.of(manifest).total_bytes
    if total:
        return total
    if path and Path(path).is_file():
        return Path(path).stat().st_size
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def _load_target(t: Target):
    from ditdeploy.runtimes import load, load_decoder

    if t.backend == "torch" and t.path is None:
        from ditdeploy.config.variants import DiTConfig
        from ditdeploy.models import create_model
        from ditdeploy.runtimes.torch import TorchDenoiser

        cfg = DiTConfig.from_dict(t.config or {})
        import torch

        torch.manual_seed(0)
        den = TorchDenoiser.from_model(create_model(cfg), **t.opts)
    else:
        den = load(t.path, backend=t.backend, **t.opts)
    dec = load_decoder(t.decoder) if t.decoder else None
    return den, dec


def run_target(t: Target, s: Settings) -> dict[str, Any]:
    """Time one target at every batch in this process; returns ``{"target": ..., "rows": [...]}``."""
    from ditdeploy.config.macs import spent_gmacs
    from ditdeploy.diffusion import sample
    from ditdeploy.proof.reference_check import effective_precision
    from ditdeploy.runtimes.base import Timed

    from .machine import gpu_memory_used_mb

    t0 = time.perf_counter()
    den, dec = _load_target(t)
    load_s = time.perf_counter() - t0
    cfg = den.config
    precision = "fp32" if t.backend == "torch" else effective_precision(den)
    size = artifact_bytes(t.path, getattr(den, "manifest", None)) if t.path else None
    if size is None and t.backend == "torch":
        size = cfg.param_count() * 4  # fp32 weights of a random-weight model
    rng = np.random.default_rng(s.seed)
    rows = []
    for b in s.batches:
        x = rng.standard_normal((b, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
        tt = rng.integers(0, 1000, size=b).astype(np.int64)
        y = rng.integers(0, cfg.num_classes, size=b).astype(np.int64)
        for _ in range(s.warmup):
            out = den(x, tt, y)
        times = []
        for _ in range(s.repeats):
            c0 = time.perf_counter()
            out = den(x, tt, y)
            times.append(time.perf_counter() - c0)
        finite = bool(np.isfinite(np.asarray(out)).all())
        ms = np.array(times) * 1e3
        row: dict[str, Any] = {
            "target": t.label, "backend": t.backend, "runtime": den.name, "precision": precision,
            "variant": cfg.variant, "input_size": cfg.input_size, "config": dataclasses.asdict(cfg),
            "batch": b, "baseline": t.baseline,
            "denoiser_ms_median": float(np.median(ms)), "denoiser_ms_p90": float(np.percentile(ms, 90)),
            "denoiser_ms_min": float(ms.min()), "denoiser_ms_all": [round(float(v), 4) for v in ms],
            "repeats": s.repeats, "warmup": s.warmup, "output_finite": finite,
            "macs_per_sample": int(cfg.macs()), "artifact_bytes": size, "load_s": load_s,
        }
        if s.e2e:
            td = Timed(den)
            noise = rng.standard_normal(x.shape).astype(np.float32)
            labels = (np.arange(b) * cfg.num_classes // b).astype(np.int64)
            e0 = time.perf_counter()
            lat = sample(td, noise, labels, method=s.sampler, steps=s.steps, cfg_scale=s.cfg_scale, seed=s.seed,
                         num_classes=cfg.num_classes, cfg_interval=s.cfg_interval, cache_interval=s.cache_interval)
            dec_s = 0.0
            if dec is not None:
                d0 = time.perf_counter()
                dec(lat)
                dec_s = time.perf_counter() - d0
            e2e = time.perf_counter() - e0
            row.update({
                "e2e_s": e2e, "images_per_s": b / e2e, "e2e_denoiser_s": td.seconds, "e2e_decoder_s": dec_s,
                "e2e_denoiser_calls": td.calls, "e2e_denoiser_rows": td.rows,
                "sampler_overhead_pct": 100.0 * max(0.0, e2e - td.seconds - dec_s) / e2e,
                "steps": s.steps, "cfg_scale": s.cfg_scale, "sampler": s.sampler, "decoded": dec is not None,
            })
            if s.less_work():
                row.update({"e2e_light_rows": td.light_rows, "cfg_interval": s.cfg_interval,
                            "cache_interval": s.cache_interval,
                            "e2e_gmac": spent_gmacs(cfg, td.rows - td.light_rows, td.light_rows)})
        row["peak_rss_mb"] = peak_rss_mb()
        row["gpu_mem_mb"] = gpu_memory_used_mb()
        rows.append(row)
    close = getattr(den, "close", None)
    if callable(close):
        close()
    return {"target": dataclasses.asdict(t), "runtime": den.name, "precision": precision, "rows": rows,
            "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if os.environ.get(k)}}


def run_target_subprocess(t: Target, s: Settings, timeout: float | None = None) -> dict[str, Any]:
    """Run :func:`run_target` in a fresh interpreter (clean peak RSS, no cross-target interference)."""
    cmd = [sys.executable, "-m", "ditdeploy.bench.harness", "--worker", t.to_json(),
           json.dumps(dataclasses.asdict(s))]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **t.env})
    except subprocess.TimeoutExpired:
        return {"target": dataclasses.asdict(t), "error": f"timed out after {timeout} s", "rows": []}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    err = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
    return {"target": dataclasses.asdict(t), "error": err, "rows": []}


def attach_derived(rows: list[dict[str, Any]], peaks: dict[str, dict[str, Any]]) -> None:
    """Add GFLOP/s, % of peak and speed-up vs the torch eager fp32 baseline (same config and batch) in place."""
    from .machine import peak_for

    base = {}
    for r in rows:
        if r.get("baseline"):
            base[(json.dumps(r["config"], sort_keys=True), r["batch"])] = r["denoiser_ms_median"]
    for r in rows:
        flops = 2.0 * r["macs_per_sample"] * r["batch"]
        r["flops_per_call"] = flops
        r["gflops"] = flops / (r["denoiser_ms_median"] / 1e3) / 1e9
        if r["backend"] == "tensorrt" or any(g in r.get("runtime", "") for g in ("CUDA", "Tensorrt", ":GPU")):
            # the probes measure this machine's CPU; a GPU row has no roof here (say so rather than divide wrongly)
            r["peak_key"], r["peak_gflops"], r["pct_of_peak"] = None, None, None
        else:
            _attach_peak(r, peaks, peak_for)
        b = base.get((json.dumps(r["config"], sort_keys=True), r["batch"]))
        r["torch_fp32_ms"] = b
        r["speedup_vs_torch_fp32"] = b / r["denoiser_ms_median"] if b else None


def _attach_peak(r: dict[str, Any], peaks: dict[str, dict[str, Any]], peak_for) -> None:
    """% of the measured matmul peak of the row's precision (int8 without an int8 probe: vs the fp32 roof)."""
    key = peak_for(r["precision"])
    pk = (peaks.get(key) or {}).get("gflops")
    if pk is None and key != "fp32":  # no probe for this precision here: compare with the fp32 roof, say so
        key, pk = "fp32", (peaks.get("fp32") or {}).get("gflops")
    r["peak_key"] = key
    r["peak_gflops"] = pk
    r["pct_of_peak"] = 100.0 * r["gflops"] / pk if pk else None


def run_bench(targets: list[Target], s: Settings, *, probe: bool = True, probe_size: int = 2048,
              in_process: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run every target (each in its own subprocess unless ``in_process``), probe the matmul peaks, and return the
    full result: machine, peaks, settings, rows, errors."""
    from tqdm import tqdm

    from .machine import machine_info, matmul_peak

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    info = machine_info()
    peaks: dict[str, dict[str, Any]] = {}
    precisions_needed = {"fp32"}
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    bar = tqdm(targets, desc="bench", unit="target", disable=not progress, file=sys.stderr)
    for t in bar:
        bar.set_postfix_str(t.label)
        if in_process:
            try:
                res = run_target(t, s)
            except Exception as e:  # one broken target must not lose the others' numbers
                res = {"target": dataclasses.asdict(t), "error": f"{type(e).__name__}: {e}", "rows": []}
        else:
            res = run_target_subprocess(t, s)
        if res.get("error"):
            errors.append({"target": t.label, "path": t.path, "error": res["error"]})
        for r in res["rows"]:
            precisions_needed.add(r["precision"])
            r["env"] = res.get("env", {})
        rows.extend(res["rows"])
    if probe:
        from .machine import peak_for

        for p in sorted({peak_for(p) for p in precisions_needed}):
            peaks[p] = matmul_peak(p, n=probe_size)
    attach_derived(rows, peaks)
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"created": started, "machine": info, "peaks": peaks, "settings": s.report(),
            "targets": [dataclasses.asdict(t) for t in targets], "rows": rows, "errors": errors}


def _worker_main(argv: list[str]) -> int:
    t = Target(**json.loads(argv[0]))
    s = Settings(**json.loads(argv[1]))
    try:
        res = run_target(t, s)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"{type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    print(RESULT_TAG + json.dumps(res, default=float))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    print("usage: python -m ditdeploy.bench.harness --worker TARGET_JSON SETTINGS_JSON", file=sys.stderr)
    sys.exit(2)
