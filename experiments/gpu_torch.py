"""PyTorch CUDA path of ditdeploy on a GPU: parity per precision, per-call speed, end to end, ONNX export from GPU.

    python3 -m experiments.gpu_torch --out DIR                 # on a CUDA machine -> DIR/gpu_torch.json
    python3 -m experiments.gpu_torch --out DIR --device cpu --quick   # S/2 only, tiny counts (code-path check)

Sections (each guarded: a failure records its error and the rest still runs; the JSON is rewritten atomically after
every measurement, so a timeout keeps what was measured):

* ``parity``: random-weights DiT (``export.randomize.random_model``; adaLN-zero/final layers filled so outputs are
  non-trivial), fixed batch-2 inputs (t spread, y with the null class). The independent reference is the same model
  in float64 on the CPU. Device fp32 (TF32 off), TF32, bf16 and fp16 autocast, and CPU fp32, are compared with it;
  device fp32 is also compared with CPU fp32. ``forward`` and ``forward_with_cfg`` (scale 4).
* ``speed``: model forward per call (CUDA events, median after warm-up) per batch and precision, images/s and
  ``torch.cuda.max_memory_allocated`` (weights included); plus the numpy ``TorchDenoiser`` call (H2D/D2H included).
* ``e2e``: ``ditdeploy.diffusion.sample`` (DDIM, cfg 4) with the torch runtime on the device; the shipped digits
  model sampled as ``ditdeploy sample`` does it (same seed, noise, labels) on the device and on the CPU.
* ``onnx``: ``export_denoiser_onnx`` of S/2 from the device model (the exporter traces it from host memory) and
  from its CPU copy; the ONNX run with ONNX Runtime's available providers vs the device torch output.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.artifact.files import write_json_atomic
from ditdeploy.proof.parity import compare

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
CFG_SCALE = 4.0


class Recorder:
    """Results dict written atomically to ``path`` after every update; ``guard`` records errors instead of raising."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.data: dict[str, Any] = {**header, "errors": {}, "seconds": {}}
        self.t0 = time.perf_counter()
        self.flush()

    def flush(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        write_json_atomic(self.path, self.data)

    def put(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value
        self.flush()

    @contextlib.contextmanager
    def guard(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        print(f"[gpu_torch] {name} ...", file=sys.stderr, flush=True)
        try:
            yield
        except Exception as e:  # record and carry on: one failure must not lose the other measurements
            self.data["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            self.data["errors"][name + ".traceback"] = traceback.format_exc()[-3000:]
            print(f"[gpu_torch] {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            _empty_cache()  # the section's models were its locals: free their cached device blocks
            self.data["seconds"][name] = round(time.perf_counter() - t0, 2)
            self.flush()


def _empty_cache() -> None:
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@functools.lru_cache(maxsize=2)
def _master(variant: str, image_size: int, seed: int) -> Any:
    """The CPU random-weights model, built once (XL/2 init takes seconds); sections work on deep copies."""
    from ditdeploy.export.randomize import random_model

    return random_model(variant, image_size=image_size, seed=seed)


def random_copy(variant: str, image_size: int, seed: int) -> Any:
    """A private CPU copy of the deterministic random-weights model (``export.randomize.random_model``)."""
    return copy.deepcopy(_master(variant, image_size, seed))


def metrics(actual: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """``ditdeploy.proof.parity.compare`` (rel-L2, cosine, max-abs, finite) plus the reference's RMS for scale."""
    return {**compare(actual, reference).metrics(), "ref_rms": float(np.sqrt(np.mean(np.asarray(reference, np.float64) ** 2)))}


def set_tf32(enabled: bool) -> dict[str, bool]:
    """Set TF32 for cuBLAS matmuls and cuDNN convolutions (legacy flags only); return the flags now in force."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
        return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}


@contextlib.contextmanager
def precision_mode(device: Any, precision: str) -> Iterator[None]:
    """fp32 (TF32 off), tf32 (TF32 on, fp32 weights), bf16 / fp16 (autocast, TF32 off); inference mode."""
    import torch

    set_tf32(precision == "tf32")
    try:
        with torch.inference_mode():
            if precision in ("bf16", "fp16"):
                dt = torch.bfloat16 if precision == "bf16" else torch.float16
                with torch.autocast(device.type, dtype=dt):
                    yield
            else:
                yield
    finally:
        set_tf32(False)


def fixed_inputs(cfg: Any, n: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """x ~ N(0,1), t spread over 10..990, labels with the null class last (cfg + ``null_class``)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cfg.in_channels, cfg.input_size, cfg.input_size), dtype=np.float32)
    t = np.linspace(10, 990, n).round().astype(np.int64)
    y = (np.arange(n, dtype=np.int64) * 7 + 3) % cfg.num_classes
    y[-1] = cfg.null_class
    return {"x": x, "t": t, "y": y}


def cfg_inputs(cfg: Any, n: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """A [cond; uncond] batch of 2n for ``forward_with_cfg`` (both halves on the same x, as the sampler builds it)."""
    f = fixed_inputs(cfg, n, seed)
    y_cond = (np.arange(n, dtype=np.int64) * 7 + 3) % cfg.num_classes
    return {"x": np.concatenate([f["x"], f["x"]]), "t": np.concatenate([f["t"], f["t"]]),
            "y": np.concatenate([y_cond, np.full(n, cfg.null_class, np.int64)])}


def run_model(model: Any, feed: dict[str, np.ndarray], device: Any, precision: str, dtype: Any = None,
              with_cfg: bool = False) -> np.ndarray:
    """One forward (or ``forward_with_cfg``) of ``model`` on ``device`` under ``precision``; float64 numpy out."""
    import torch

    dtype = dtype or torch.float32
    x = torch.from_numpy(feed["x"]).to(device=device, dtype=dtype)
    t = torch.from_numpy(feed["t"]).to(device)
    y = torch.from_numpy(feed["y"]).to(device)
    with precision_mode(device, precision):
        out = model.forward_with_cfg(x, t, y, CFG_SCALE) if with_cfg else model(x, t, y)
    return out.detach().to("cpu", torch.float64).numpy()


def section_parity(rec: Recorder, variant: str, image_size: int, device: Any, seed: int) -> None:
    """Device precisions and CPU fp32 vs the CPU float64 reference; device fp32 vs CPU fp32."""
    import torch

    key = f"{variant}@{image_size}"
    cpu = torch.device("cpu")
    model = random_copy(variant, image_size, seed)
    ref64 = copy.deepcopy(model).double()
    res: dict[str, Any] = {"variant": variant, "image_size": image_size, "batch": 2, "seed": seed,
                           "params": sum(p.numel() for p in model.parameters())}
    feeds = {"forward": fixed_inputs(model.config, 2, seed), "forward_with_cfg": cfg_inputs(model.config, 2, seed)}
    res["inputs"] = {k: {"t": v["t"].tolist(), "y": v["y"].tolist()} for k, v in feeds.items()}
    refs = {k: run_model(ref64, f, cpu, "fp32", torch.float64, with_cfg=k != "forward") for k, f in feeds.items()}
    del ref64
    cpu32 = {k: run_model(model, f, cpu, "fp32", with_cfg=k != "forward") for k, f in feeds.items()}
    for k in feeds:
        res[f"{k}/cpu_fp32_vs_f64"] = metrics(cpu32[k], refs[k])
    rec.put("parity", key, res)
    if device.type != "cpu":
        model = model.to(device)
    for prec in PRECISIONS:
        for k, f in feeds.items():
            name = f"{k}/{device.type}_{prec}_vs_f64"
            try:
                out = run_model(model, f, device, prec, with_cfg=k != "forward")
                res[name] = metrics(out, refs[k])
                if prec == "fp32":
                    res[f"{k}/{device.type}_fp32_vs_cpu_fp32"] = metrics(out, cpu32[k])
            except Exception as e:  # e.g. an autocast dtype a CPU build lacks
                res[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        rec.put("parity", key, res)
    del model
    _empty_cache()


def time_ms(fn: Callable[[], Any], device: Any, warmup: int, iters: int) -> list[float]:
    """Per-call milliseconds of ``fn``: CUDA events on a GPU, synchronize + perf_counter elsewhere."""
    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for s, e in ev:
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in ev]
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _stats(ms: list[float], batch: int) -> dict[str, Any]:
    med = statistics.median(ms)
    return {"median_ms": round(med, 4), "min_ms": round(min(ms), 4), "max_ms": round(max(ms), 4), "n": len(ms),
            "images_per_s": round(batch * 1e3 / med, 2)}


def section_speed(rec: Recorder, variant: str, image_size: int, device: Any, batches: list[int], warmup: int,
                  iters: int, seed: int) -> None:
    """Model forward per call for every batch x precision; then the numpy TorchDenoiser call (fp32)."""
    import torch

    from ditdeploy.runtimes.torch import TorchDenoiser

    key = f"{variant}@{image_size}"
    model = random_copy(variant, image_size, seed).to(device)
    cuda = device.type == "cuda"
    res: dict[str, Any] = {"variant": variant, "image_size": image_size, "warmup": warmup, "iters": iters,
                           "timer": "cuda events" if cuda else "perf_counter", "rows": {}}
    if cuda:
        res["weights_bytes"] = torch.cuda.memory_allocated()
    for b in batches:
        f = fixed_inputs(model.config, b, seed)
        f["y"] = f["y"] % model.config.num_classes  # speed: conditional labels
        x, t, y = (torch.from_numpy(f[k]).to(device) for k in ("x", "t", "y"))
        for prec in PRECISIONS:
            row = f"b{b}/{prec}"
            try:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                with precision_mode(device, prec):
                    ms = time_ms(lambda x=x, t=t, y=y: model(x, t, y), device, warmup, iters)
                r = {"batch": b, "precision": prec, **_stats(ms, b)}
                if cuda:
                    r["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                res["rows"][row] = r
            except Exception as e:
                res["rows"][row] = {"batch": b, "precision": prec, "error": f"{type(e).__name__}: {e}"[:500]}
                _empty_cache()
            rec.put("speed", key, res)
    # the runtime's numpy call (host->device copy, forward, device->host copy), fp32 TF32 off
    set_tf32(False)
    den = TorchDenoiser.from_model(model, device=str(device))
    res["torch_runtime_call"] = {}
    for b in batches:
        f = fixed_inputs(model.config, b, seed)
        ms = time_ms(lambda f=f: den(f["x"], f["t"], f["y"]), torch.device("cpu"), warmup, iters)
        res["torch_runtime_call"][f"b{b}/fp32"] = {"batch": b, **_stats(ms, b)}
        rec.put("speed", key, res)


def section_e2e(rec: Recorder, variant: str, image_size: int, device: Any, images: int, steps: int,
                seed: int) -> None:
    """``diffusion.sample`` (DDIM, cfg 4) with the torch runtime on ``device``, fp32 TF32 off."""
    import torch

    from ditdeploy.diffusion import sample
    from ditdeploy.runtimes import Timed
    from ditdeploy.runtimes.torch import TorchDenoiser

    set_tf32(False)
    model = random_copy(variant, image_size, seed)
    cfg = model.config
    den = TorchDenoiser.from_model(model, device=str(device))
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((images, cfg.in_channels, cfg.input_size, cfg.input_size), dtype=np.float32)
    labels = (np.arange(images, dtype=np.int64) * 97) % cfg.num_classes
    kw = dict(method="ddim", cfg_scale=CFG_SCALE, num_classes=cfg.num_classes, seed=seed)
    sample(den, noise, labels, steps=2, **kw)  # warm-up (kernels, allocator)
    timed = Timed(den)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    x0 = sample(timed, noise, labels, steps=steps, **kw)
    wall = time.perf_counter() - t0
    rec.put("e2e", f"{variant}@{image_size}", {
        "variant": variant, "image_size": image_size, "device": str(device), "precision": "fp32 (TF32 off)",
        "method": "ddim", "steps": steps, "cfg_scale": CFG_SCALE, "images": images,
        "denoiser_batch": images * 2 if CFG_SCALE > 1 else images,
        "wall_s": round(wall, 4), "per_step_ms": round(wall / steps * 1e3, 3),
        "denoiser_s": round(timed.seconds, 4), "denoiser_calls": timed.calls,
        "sampler_overhead_s": round(max(0.0, wall - timed.seconds), 4), "images_per_s": round(images / wall, 3),
        "x0_finite": bool(np.isfinite(x0).all()), "x0_std": float(np.std(x0)),
    })
    del model, den
    _empty_cache()


def _digits_sample(device: str, steps: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The shipped digits model sampled as ``ditdeploy sample`` does (default labels, cfg, per-image noise)."""
    from ditdeploy.run.generation import SampleRequest, generate

    res = generate(SampleRequest(backend="torch", options={"device": device}, steps=steps, seed=seed, out=None))
    t = res.timings
    return res.latents, {"wall_s": round(t.denoiser_s + t.sampler_overhead_s, 4), "images": res.count,
                         "cfg_scale": res.cfg_scale, "backend": res.backend}


def section_digits(rec: Recorder, device: Any, steps: int, seed: int) -> None:
    """Digits samples on ``device`` vs the CPU, same seed: max-abs of x_0 and of the uint8 images."""
    from ditdeploy.run import images

    set_tf32(False)
    _digits_sample(str(device), 2, seed)  # warm-up
    dev_x0, dev_info = _digits_sample(str(device), steps, seed)
    cpu_x0, cpu_info = _digits_sample("cpu", steps, seed)
    u_dev, u_cpu = images.to_uint8(dev_x0).astype(np.int16), images.to_uint8(cpu_x0).astype(np.int16)
    rec.put("e2e", "digits", {
        "method": "ddim", "steps": steps, "seed": seed, "precision": "fp32 (TF32 off)", "device": dev_info,
        "cpu": cpu_info, "x0_vs_cpu": metrics(dev_x0, cpu_x0),
        "uint8_max_abs_diff": int(np.abs(u_dev - u_cpu).max()),
        "uint8_pixels_differing": int((u_dev != u_cpu).sum()), "uint8_pixels": int(u_dev.size),
    })


def section_onnx(rec: Recorder, device: Any, seed: int, workdir: Path) -> None:
    """S/2 ONNX export from the device model (attempt) and from its CPU copy; ORT output vs device torch fp32."""
    import onnxruntime as ort

    from ditdeploy.export.onnx import export_denoiser_onnx
    from ditdeploy.runtimes import load

    res: dict[str, Any] = {"variant": "S/2", "image_size": 256, "ort_available_providers": ort.get_available_providers()}
    model = random_copy("S/2", 256, seed)
    dev_model = copy.deepcopy(model).to(device)
    feed = fixed_inputs(model.config, 2, seed)
    torch_dev = run_model(dev_model, feed, device, "fp32")
    exported: dict[str, Path] = {}
    for where, m in (("from_device_model", dev_model), ("from_cpu_model", model)):
        path = workdir / f"s2-{where}.onnx"
        t0 = time.perf_counter()
        try:
            man = export_denoiser_onnx(m, path, verify=where == "from_cpu_model", seed=seed)
            res[where] = {"ok": True, "export_s": round(time.perf_counter() - t0, 2), "parity_at_export":
                          man.get("parity"), "verified": man.get("verified")}
            exported[where] = path
        except Exception as e:  # recorded, not raised: the other export is still measured
            res[where] = {"ok": False, "export_s": round(time.perf_counter() - t0, 2),
                          "error": f"{type(e).__name__}: {e}"[:1500]}
        rec.put("onnx", "S/2@256", res)
    for where, path in exported.items():
        for prov in dict.fromkeys([None, "cpu"]):
            try:
                den = load(path, backend="onnxruntime", **({"providers": prov} if prov else {}))
                out = den(feed["x"], feed["t"], feed["y"])
                res[f"{where}/ort[{den.name}]_vs_torch_{device.type}_fp32"] = metrics(out, torch_dev)
            except Exception as e:
                res[f"{where}/ort[{prov or 'default'}]"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            rec.put("onnx", "S/2@256", res)
    del model, dev_model
    _empty_cache()


def main(argv: list[str] | None = None) -> None:
    """Run the sections in order of importance and write ``OUT/gpu_torch.json``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_torch.json")
    ap.add_argument("--device", default="cuda", help="torch device (default cuda)")
    ap.add_argument("--quick", action="store_true", help="S/2 only, tiny counts (check the code path on a CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sections", default="parity,speed,e2e,digits,onnx", help="comma-separated subset")
    args = ap.parse_args(argv)

    import torch

    from ditdeploy.bench.machine import cuda_info, machine_info

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu (with --quick)")
    args.out.mkdir(parents=True, exist_ok=True)
    variants = ["S/2"] if args.quick else ["S/2", "XL/2"]
    batches = [2] if args.quick else [2, 8, 32]
    warmup, iters = (1, 3) if args.quick else (5, 25)
    steps = 5 if args.quick else 50
    images = 2 if args.quick else 8
    header = {"benchmark": "experiments.gpu_torch", "device": str(device), "quick": args.quick,
              "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "settings": {"variants": variants, "batches": batches, "warmup": warmup, "iters": iters,
                           "e2e_steps": steps, "e2e_images": images, "cfg_scale": CFG_SCALE}}
    rec = Recorder(args.out / "gpu_torch.json", header)
    with rec.guard("machine"):
        rec.data["machine"] = machine_info()
        rec.data["cuda"] = cuda_info()
    sections = set(args.sections.split(","))
    for v in variants if "parity" in sections else []:
        with rec.guard(f"parity {v}"):
            section_parity(rec, v, 256, device, args.seed)
    for v in (variants[-1:] if "speed" in sections else []):
        with rec.guard(f"speed {v}"):
            section_speed(rec, v, 256, device, batches, warmup, iters, args.seed)
    if "e2e" in sections:
        with rec.guard(f"e2e {variants[-1]}"):
            section_e2e(rec, variants[-1], 256, device, images, steps, args.seed)
    if "digits" in sections:
        with rec.guard("e2e digits"):
            section_digits(rec, device, steps, args.seed)
    if "onnx" in sections:
        with rec.guard("onnx S/2"), tempfile.TemporaryDirectory(prefix="gpu_torch_onnx_") as tmp:
            section_onnx(rec, device, args.seed, Path(tmp))
    rec.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rec.flush()
    print(f"[gpu_torch] wrote {rec.path} ({len([k for k in rec.data['errors'] if '.' not in k])} error(s))",
          file=sys.stderr)


if __name__ == "__main__":
    main()
