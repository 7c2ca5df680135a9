"""Head-to-head on the same work: diffusers' ``DiTPipeline`` vs an official-style torch eager loop vs ditdeploy.

The work: class-conditional sampling of ``--batch`` images at 256 px with a DiT-XL/2-sized model (random weights,
built in-process, nothing downloaded), ``--steps`` DPM-Solver++ (2M) steps, classifier-free guidance ``--cfg-scale``
(denoiser batch = 2 x images), then an SD-VAE-sized ``AutoencoderKL`` decode to pixels. Contenders:

* ``diffusers``: ``DiTPipeline(DiTTransformer2DModel(XL/2 config), AutoencoderKL(SD-VAE config),
  DPMSolverMultistepScheduler)`` in torch eager fp32: what users run today.
* ``torch``: the official-style loop: ``ditdeploy.models.DiT`` (official numerics) in torch eager fp32, guidance via
  the doubled batch, the same DPM-Solver++ sampler (``ditdeploy.diffusion``), the same VAE decoded in torch.
* ``ort-fp32``, ``ov-bf16``, ``ort-int8``, ...: ditdeploy's exported denoiser on ONNX Runtime / OpenVINO (fp32, the
  bf16 inference hint, dynamic INT8) with the VAE decoder exported to ONNX, run by ``ditdeploy.diffusion.sample``;
  ``ov-int8``: a static Q/DQ INT8 export of the same weights (``--paired-ov-int8 PATH``, or ``auto``: built in the
  workdir by ``calibrate`` + ``export --checkpoint FP32.onnx --precision int8``) on OpenVINO.
* ``recipe``: a ``ditdeploy tune`` recipe (``--recipe FILE``, tuned on artifacts of the same weights): its artifact,
  backend, threads, precision hint (also the decoder's, on OpenVINO) and less-work settings; its latent drift vs full
  work is reported like the less-work rows'.

Each contender runs in its own subprocess (XL/2 weights are 2.7 GB; the machine's memory is shared), ``--repeats``
times after nothing but model construction/loading (the first run pays one-off costs such as ORT's arena growth; the
median is reported and every run is kept). For the ditdeploy contenders, the final latents are also compared with the
torch contender's (same noise, same weights) so the accuracy price of bf16/INT8 is in the same table.

Usage (heavy: ~10-20 min on 2 cores; run when the machine is quiet)::

    python -m experiments.h2h_diffusers --out bench/results/h2h_xl2_256.json
    python -m experiments.h2h_diffusers --model S/2 --steps 5 --contenders diffusers,torch,ort-fp32  # quick
    python -m experiments.h2h_diffusers --contenders "" --paired 5 --paired-ov-int8 xl2-int8.onnx  # calls only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULT_TAG = "DITDEPLOY_H2H_RESULT "
ALL_CONTENDERS = ("diffusers", "torch", "ort-fp32", "ov-f32", "ov-bf16", "ort-int8", "ov-int8", "ort-pair",
                  "ort-less", "ov-less", "recipe")
LESS_WORK = ("ort-pair", "ort-less", "ov-less")  # contenders on the two-graph (--cache-graphs) export
DEFAULT_CONTENDERS = ("diffusers", "torch", "ort-fp32", "ov-f32", "ort-int8")

# SD VAE (stabilityai/sd-vae-ft-*) architecture, random weights
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)


@dataclasses.dataclass
class Work:
    model: str = "XL/2"
    image_size: int = 256
    batch: int = 1
    steps: int = 25
    cfg_scale: float = 4.0
    seed: int = 0
    repeats: int = 1
    threads: int | None = None
    workdir: str = ""
    decoder_backend: str = "openvino"
    omp_wait_policy: str = "PASSIVE"
    ov_int8: str = ""  # optional static Q/DQ INT8 ONNX of the same weights, timed on OpenVINO in the paired run
    recipe: str = ""  # a `ditdeploy tune` recipe file (the "recipe" contender)
    cfg_interval: list[int] | None = None  # less-work contenders: guidance only at timesteps lo..hi
    cache_interval: int | None = None  # less-work contenders: feature reuse, every N-th step full


def _cpu_s() -> float:
    """User + system CPU seconds of this process so far (all threads): less sensitive than wall time to other
    processes sharing the cores, though spin-waiting thread pools inflate it."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _config(w: Work):
    from ditdeploy.config.variants import variant_config

    return variant_config(w.model, image_size=w.image_size)


def _labels(w: Work, num_classes: int) -> np.ndarray:
    demo = np.array([207, 360, 387, 974, 88, 979, 417, 279], dtype=np.int64) % num_classes
    return np.resize(demo, w.batch)


def _noise(w: Work, cfg) -> np.ndarray:
    rng = np.random.default_rng(w.seed)
    return rng.standard_normal((w.batch, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)


def _set_threads(w: Work) -> None:
    if w.threads:
        import torch

        torch.set_num_threads(w.threads)


# ----------------------------------------------------------------------------------------------------------------
# shared random weights (built once, saved in the workdir, so every contender runs the same numbers)
# ----------------------------------------------------------------------------------------------------------------
def _dit_model(w: Work):
    """ditdeploy's DiT with deterministic random weights (``ditdeploy.export.randomize``: the zero-initialised adaLN
    and final layers filled too, so outputs are not identically zero and parity numbers mean something)."""
    from ditdeploy.export.randomize import random_model

    return random_model(w.model, image_size=w.image_size, seed=w.seed)


def _vae_dir(w: Work) -> Path:
    d = Path(w.workdir) / "vae"
    if not (d / "config.json").exists():
        import torch
        from diffusers import AutoencoderKL

        torch.manual_seed(w.seed + 1)
        AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(d)
    return d


def _checkpoint(w: Work) -> Path:
    p = Path(w.workdir) / f"dit-{w.model.replace('/', '')}-{w.image_size}-random.safetensors"
    if not p.exists():
        from ditdeploy.sources.checkpoints import save_safetensors

        m = _dit_model(w)
        save_safetensors(m, p, m.config)
    return p


# ----------------------------------------------------------------------------------------------------------------
# contenders (each runs inside its own subprocess)
# ----------------------------------------------------------------------------------------------------------------
def _diffusers_transformer(w: Work):
    """diffusers' DiT transformer with the variant's shape and random weights (diffusers' own init)."""
    import torch
    from diffusers import DiTTransformer2DModel

    cfg = _config(w)
    torch.manual_seed(w.seed)
    return DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        sample_size=cfg.input_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes).eval()


def run_paired(w: Work) -> dict[str, Any]:
    """Denoiser calls of diffusers' transformer and ditdeploy's ONNX Runtime fp32 / INT8 denoisers, interleaved
    round-robin in one process on the same inputs (batch = 2 x images, as with guidance), so slow changes of the
    machine's load hit every contender alike; ``w.repeats`` rounds after one warm-up round."""
    import torch

    from ditdeploy.runtimes import load

    _set_threads(w)
    cfg = _config(w)
    onnx_path, _ = _onnx_paths(w)
    tr = _diffusers_transformer(w)
    ort32 = load(onnx_path, backend="onnxruntime")
    ort8 = load(_int8dyn_path(w), backend="onnxruntime")
    n = 2 * w.batch
    rng = np.random.default_rng(w.seed)
    x = rng.standard_normal((n, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
    t = np.full(n, 500, dtype=np.int64)
    y = np.concatenate([_labels(w, cfg.num_classes), np.full(w.batch, cfg.null_class)]).astype(np.int64)
    xt, tt, yt = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)

    def diffusers_call():
        with torch.inference_mode():
            tr(xt, timestep=tt, class_labels=yt)

    fns = {"diffusers": diffusers_call, "ort-fp32": lambda: ort32(x, t, y), "ort-int8": lambda: ort8(x, t, y)}
    if w.ov_int8:
        ov8 = load(_ov_int8(w), backend="openvino")
        fns["ov-int8-qdq"] = lambda: ov8(x, t, y)
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for rnd in range(w.repeats + 1):
        for k in order[rnd % len(order):] + order[: rnd % len(order)]:  # rotate who goes first
            c0, t0 = _cpu_s(), time.perf_counter()
            fns[k]()
            if rnd:  # round 0 is the warm-up
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(_cpu_s() - c0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"runtime": "interleaved denoiser calls", "call_batch": n, "times_s": times, "cpu_s": cpu,
            "median_s": med, "speedup_vs_diffusers": {k: med["diffusers"] / v for k, v in med.items()},
            "peak_rss_mb": _rss_mb()}


def run_diffusers(w: Work) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, DiTPipeline, DPMSolverMultistepScheduler

    _set_threads(w)
    cfg = _config(w)
    transformer = _diffusers_transformer(w)
    vae = AutoencoderKL.from_pretrained(_vae_dir(w))
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2)
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    labels = [int(v) for v in _labels(w, cfg.num_classes)]
    calls = {"n": 0, "s": 0.0}
    orig_forward = transformer.forward

    def counted(*a, **k):
        t0 = time.perf_counter()
        try:
            return orig_forward(*a, **k)
        finally:
            calls["n"] += 1
            calls["s"] += time.perf_counter() - t0

    transformer.forward = counted
    times, den_s, cpu = [], [], []
    for _ in range(w.repeats):
        calls.update(n=0, s=0.0)
        g = torch.Generator().manual_seed(w.seed)
        c0 = _cpu_s()
        t0 = time.perf_counter()
        with torch.inference_mode():
            img = pipe(class_labels=labels, guidance_scale=w.cfg_scale, generator=g,
                       num_inference_steps=w.steps, output_type="np").images
        times.append(time.perf_counter() - t0)
        cpu.append(_cpu_s() - c0)
        den_s.append(calls["s"])
    return {"runtime": f"diffusers {__import__('diffusers').__version__} DiTPipeline torch eager fp32",
            "times_s": times, "cpu_s": cpu, "denoiser_s": den_s, "denoiser_calls": calls["n"],
            "image_shape": list(np.asarray(img).shape), "peak_rss_mb": _rss_mb()}


def _run_ditdeploy_loop(w: Work, den, dec, label: str, less: bool = False) -> dict[str, Any]:
    from ditdeploy.config.macs import spent_gmacs
    from ditdeploy.diffusion import sample
    from ditdeploy.runtimes.base import Timed

    cfg = den.config
    noise, labels = _noise(w, cfg), _labels(w, cfg.num_classes)
    times, den_s, dec_s, cpu = [], [], [], []
    lat = None
    for _ in range(w.repeats):
        td, tdec = Timed(den), Timed(dec)
        c0 = _cpu_s()
        t0 = time.perf_counter()
        lat = sample(td, noise, labels, method="dpm-solver++", steps=w.steps, cfg_scale=w.cfg_scale, seed=w.seed,
                     num_classes=cfg.num_classes, cfg_interval=w.cfg_interval if less else None,
                     cache_interval=w.cache_interval if less else None)
        img = tdec(lat)
        times.append(time.perf_counter() - t0)
        cpu.append(_cpu_s() - c0)
        den_s.append(td.seconds)
        dec_s.append(tdec.seconds)
    out = Path(w.workdir) / f"latents-{label}.npy"
    np.save(out, lat)
    return {"runtime": f"{den.name} + decoder {dec.name}", "times_s": times, "cpu_s": cpu, "denoiser_s": den_s,
            "decoder_s": dec_s, "denoiser_calls": td.calls, "denoiser_rows": td.rows, "light_rows": td.light_rows,
            "gmac": spent_gmacs(cfg, td.rows - td.light_rows, td.light_rows),
            "cfg_interval": w.cfg_interval if less else None, "cache_interval": w.cache_interval if less else None,
            "image_shape": list(np.asarray(img).shape), "peak_rss_mb": _rss_mb(), "latents": str(out)}


def run_torch(w: Work) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    from ditdeploy.runtimes import load
    from ditdeploy.runtimes.torch import TorchDecoder

    _set_threads(w)
    den = load(_checkpoint(w), backend="torch", **({"threads": w.threads} if w.threads else {}))
    dec = TorchDecoder(AutoencoderKL.from_pretrained(_vae_dir(w)))
    return _run_ditdeploy_loop(w, den, dec, "torch")


def _onnx_paths(w: Work) -> tuple[Path, Path]:
    d = Path(w.workdir)
    return d / f"dit-{w.model.replace('/', '')}-{w.image_size}.onnx", d / "vae-decoder.onnx"


def _int8dyn_path(w: Work) -> Path:
    onnx_path, _ = _onnx_paths(w)
    return onnx_path.with_name(onnx_path.stem + "-int8dyn.onnx")


def _static_int8_path(w: Work) -> Path:
    onnx_path, _ = _onnx_paths(w)
    return onnx_path.with_name(onnx_path.stem + "-int8.onnx")


def prepare_static_int8(w: Work) -> dict[str, Any]:
    """``--paired-ov-int8 auto``: the static Q/DQ INT8 of the workdir's fp32 export, built the way a user does
    (``calibrate`` one trajectory of the timed sampler, then ``export --checkpoint FP32.onnx --precision int8``:
    the fp32 graph is quantized as it is), with CPU seconds and denoiser calls recorded."""
    from ditdeploy.calibration.capture import CaptureSettings, capture_calibration_set
    from ditdeploy.calibration.quantize import quantize_int8
    from ditdeploy.runtimes import load
    from ditdeploy.runtimes.base import Timed

    onnx_path, _ = _onnx_paths(w)
    calib, out = Path(w.workdir) / "calib-dpm.npz", _static_int8_path(w)
    info: dict[str, Any] = {}
    if not calib.exists():
        den = Timed(load(onnx_path, backend="onnxruntime"))
        c0, t0 = _cpu_s(), time.perf_counter()
        capture_calibration_set(den, calib, CaptureSettings(samples=1, steps=w.steps, sampler="dpm-solver++",
                                                            cfg_scale=w.cfg_scale, seed=w.seed),
                                source={"path": onnx_path.name, "sha256": _sha(onnx_path), "backend": den.name},
                                progress=False)
        info.update(calibrate_s=time.perf_counter() - t0, calibrate_cpu_s=_cpu_s() - c0, calibrate_calls=den.calls,
                    calibrate_rows=den.rows)
    if not out.exists():
        c0, t0 = _cpu_s(), time.perf_counter()
        quantize_int8(onnx_path, out, calib, progress=False)
        info.update(quantize_s=time.perf_counter() - t0, quantize_cpu_s=_cpu_s() - c0)
    info["peak_rss_mb"] = _rss_mb()
    return info


def _sha(p: Path) -> str:
    from ditdeploy.artifact.files import sha256_file

    return sha256_file(p)


def run_recipe(w: Work) -> dict[str, Any]:
    """The ``recipe`` contender: the tuned recipe's artifact / backend / options / less-work settings; the decoder
    the artifact names (else the workdir's) on the same backend with the same precision hint."""
    from ditdeploy.run.generation import SampleRequest
    from ditdeploy.run.recipes import apply_recipe
    from ditdeploy.runtimes import load, load_decoder

    req = apply_recipe(SampleRequest(out=None), w.recipe)
    opts = {k: v for k, v in req.options.items() if v is not None}
    den = load(req.engine, backend=req.backend, **opts)
    _, vae_path = _onnx_paths(w)
    from ditdeploy.artifact.manifest import Manifest

    dec_path = Manifest.of(den.manifest, den.path).decoder_path() or vae_path
    dec_opts = {k: v for k, v in opts.items() if k == "threads" or req.backend == "openvino"}
    dec = load_decoder(dec_path, backend="openvino" if req.backend == "openvino" else None, **dec_opts)
    less = dataclasses.replace(w, cfg_interval=req.cfg_interval, cache_interval=req.cache_interval)
    res = _run_ditdeploy_loop(less, den, dec, "recipe", less=True)
    res["recipe"] = {"file": w.recipe, "engine": str(req.engine), "backend": req.backend, "options": opts,
                     "cfg_interval": req.cfg_interval, "cache_interval": req.cache_interval}
    return res


def _pair_path(w: Work) -> Path:
    return Path(w.workdir) / f"dit-{w.model.replace('/', '')}-{w.image_size}-pair.onnx"


def prepare_pair(w: Work) -> dict[str, Any]:
    """The two-graph (full + light) export of the same weights, and the VAE decoder ONNX."""
    from ditdeploy.export.cache_graphs import export_cache_graphs
    from ditdeploy.export.vae import export_vae_decoder_onnx

    info: dict[str, Any] = {}
    _, vae_path = _onnx_paths(w)
    if not _pair_path(w).exists():
        from ditdeploy.sources.checkpoints import load_model

        model = load_model(_checkpoint(w))
        t0 = time.perf_counter()
        export_cache_graphs(model, _pair_path(w), batch_sizes=(1, 2), source={"checkpoint": _checkpoint(w).name})
        info["pair_export_s"] = time.perf_counter() - t0
    if not vae_path.exists():
        t0 = time.perf_counter()
        export_vae_decoder_onnx(str(_vae_dir(w)), vae_path, latent_sizes=(w.image_size // 8,), batch_sizes=(1,))
        info["decoder_export_s"] = time.perf_counter() - t0
    info["peak_rss_mb"] = _rss_mb()
    return info


def run_less(w: Work, which: str) -> dict[str, Any]:
    """The two-graph export: ``ort-pair`` full work (ORT fp32, decoder OpenVINO f32); ``ort-less`` the same with
    ``w.cfg_interval`` / ``w.cache_interval`` and the decoder on OpenVINO bf16; ``ov-less`` also the denoiser on
    OpenVINO with the bf16 hint. Less-work rows also record the bf16 decoder's PSNR against the f32 decoder on the
    same latents (outside the timed run)."""
    from ditdeploy.proof import distances
    from ditdeploy.runtimes import load, load_decoder

    _, vae_path = _onnx_paths(w)
    th = {"threads": w.threads} if w.threads else {}
    if which == "ort-pair":
        den = load(_pair_path(w), backend="onnxruntime", **th)
        return _run_ditdeploy_loop(w, den, load_decoder(vae_path, backend="openvino", precision_hint="f32", **th),
                                   which)
    if which == "ort-less":
        den = load(_pair_path(w), backend="onnxruntime", **th)
    else:
        den = load(_pair_path(w), backend="openvino", precision_hint="bf16", **th)
    dec = load_decoder(vae_path, backend="openvino", precision_hint="bf16", **th)
    res = _run_ditdeploy_loop(w, den, dec, which, less=True)
    lat = np.load(res["latents"])
    ref = np.asarray(load_decoder(vae_path, backend="openvino", precision_hint="f32", **th)(lat), np.float64)
    got = np.asarray(dec(lat), np.float64)
    r255, g255 = (np.clip(ref, -1, 1) + 1) * 127.5, (np.clip(got, -1, 1) + 1) * 127.5
    res["decoder_bf16_psnr_vs_f32_db"] = distances.psnr(g255, r255, 255.0)
    return res


def prepare_exports(w: Work, need_int8: bool) -> dict[str, Any]:
    """Export the denoiser (fp32 ONNX) and the VAE decoder once; dynamic INT8 when asked. Returns timings."""
    from ditdeploy.export.onnx import export_denoiser_onnx
    from ditdeploy.export.vae import export_vae_decoder_onnx

    onnx_path, vae_path = _onnx_paths(w)
    info: dict[str, Any] = {}
    if not onnx_path.exists():
        from ditdeploy.sources.checkpoints import load_model

        model = load_model(_checkpoint(w))
        t0 = time.perf_counter()
        export_denoiser_onnx(model, onnx_path, precision="fp32", source={"checkpoint": _checkpoint(w).name})
        info["export_s"] = time.perf_counter() - t0
    if not vae_path.exists():
        t0 = time.perf_counter()
        export_vae_decoder_onnx(str(_vae_dir(w)), vae_path, latent_sizes=(w.image_size // 8,), batch_sizes=(1,))
        info["decoder_export_s"] = time.perf_counter() - t0
    int8 = _int8dyn_path(w)
    if need_int8 and not int8.exists():
        from ditdeploy.calibration.quantize import quantize_int8

        t0 = time.perf_counter()
        quantize_int8(onnx_path, int8, mode="dynamic", progress=False)
        info["int8_quantize_s"] = time.perf_counter() - t0
    info["peak_rss_mb"] = _rss_mb()
    return info


def run_exported(w: Work, which: str) -> dict[str, Any]:
    """A ditdeploy contender: the exported denoiser on its runtime; the exported VAE decoder on
    ``w.decoder_backend`` (OpenVINO f32 by default: it decoded faster than ONNX Runtime here), except the OpenVINO
    contenders, which run the decoder with their own precision hint."""
    from ditdeploy.runtimes import load, load_decoder

    onnx_path, vae_path = _onnx_paths(w)
    th = {"threads": w.threads} if w.threads else {}
    dec_opts = {"precision_hint": "f32"} if w.decoder_backend == "openvino" else {}
    if which == "ort-fp32":
        den = load(onnx_path, backend="onnxruntime", **th)
    elif which in ("ov-f32", "ov-bf16"):
        hint = which.split("-")[1]
        den = load(onnx_path, backend="openvino", precision_hint=hint, **th)
        dec = load_decoder(vae_path, backend="openvino", precision_hint=hint, **th)
        return _run_ditdeploy_loop(w, den, dec, which)
    elif which == "ort-int8":
        den = load(_int8dyn_path(w), backend="onnxruntime", **th)
    elif which == "ov-int8":  # the static Q/DQ artifact (--paired-ov-int8 PATH) on OpenVINO, decoder OpenVINO f32
        if not w.ov_int8:
            raise ValueError("ov-int8 needs --paired-ov-int8 PATH (a static Q/DQ INT8 ONNX of the same weights)")
        den = load(_ov_int8(w), backend="openvino", **th)
        dec = load_decoder(vae_path, backend="openvino", precision_hint="f32", **th)
        return _run_ditdeploy_loop(w, den, dec, which)
    else:
        raise ValueError(which)
    dec = load_decoder(vae_path, backend=w.decoder_backend, **dec_opts, **th)
    return _run_ditdeploy_loop(w, den, dec, which)


def _child(which: str, w: Work) -> dict[str, Any]:
    if which == "prepare":
        return prepare_exports(w, need_int8=True)
    if which == "prepare-noint8":
        return prepare_exports(w, need_int8=False)
    if which == "diffusers":
        return run_diffusers(w)
    if which == "paired":
        return run_paired(w)
    if which == "torch":
        return run_torch(w)
    if which == "prepare-pair":
        return prepare_pair(w)
    if which == "prepare-static-int8":
        return prepare_static_int8(w)
    if which == "recipe":
        return run_recipe(w)
    if which in LESS_WORK:
        return run_less(w, which)
    return run_exported(w, which)


def w_env(w: Work) -> dict[str, str]:
    """Child environment: torch's OpenMP threads sleep when idle (``OMP_WAIT_POLICY``, default PASSIVE) so that on a
    shared CPU the torch contenders (diffusers included) are not slowed by spinning barriers; ONNX Runtime sessions
    here do not spin either. This is conservative for the speed-up: it only ever helps the torch contenders."""
    return {"OMP_WAIT_POLICY": w.omp_wait_policy} if w.omp_wait_policy else {}


def _spawn(which: str, w: Work, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "experiments.h2h_diffusers", "--child", which,
           "--work-json", json.dumps(dataclasses.asdict(w))]
    print(f"[h2h] {which} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **w_env(w)},
                           cwd=Path(__file__).resolve().parents[1])  # experiments/ is run from the checkout
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["wall_incl_startup_s"] = time.perf_counter() - t0
            print(f"[h2h] {which}: {res.get('times_s')}", file=sys.stderr, flush=True)
            return res
    tail = "\n".join(p.stderr.strip().splitlines()[-15:])
    return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1], "stderr_tail": tail}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="XL/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1, help="images (denoiser batch is 2x with guidance)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY of the children ('' = inherit)")
    ap.add_argument("--decoder-backend", default="openvino", choices=("openvino", "onnxruntime"),
                    help="runtime of the exported VAE decoder for the ort-* contenders")
    ap.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                    help=f"comma-separated subset of {', '.join(ALL_CONTENDERS)}")
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/ditdeploy/h2h"))
    ap.add_argument("--timeout", type=float, default=3600.0, help="per contender, seconds")
    ap.add_argument("--paired", type=int, default=0,
                    help="also time N interleaved rounds of single denoiser calls: diffusers vs ORT fp32 vs ORT INT8")
    ap.add_argument("--paired-ov-int8", default="",
                    help="static Q/DQ INT8 ONNX of the same seed's weights (or 'auto': calibrate + quantize the "
                         "workdir's fp32 export): timed on OpenVINO in --paired and as the ov-int8 contender")
    ap.add_argument("--recipe", default="", help="a `ditdeploy tune` recipe of the same weights: the 'recipe' "
                                                 "contender")
    ap.add_argument("--cfg-interval", default=None, help="LO,HI for the less-work contenders (ort-less, ov-less)")
    ap.add_argument("--cache-interval", type=int, default=None, help="N for the less-work contenders")
    ap.add_argument("--out", default=None, help="JSON results file (default: print only)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work-json", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.child:
        w = Work(**json.loads(a.work_json))
        print(RESULT_TAG + json.dumps(_child(a.child, w), default=float), flush=True)
        return 0

    contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    bad = [c for c in contenders if c not in ALL_CONTENDERS]
    if bad:
        ap.error(f"unknown contenders {bad}; choose from {', '.join(ALL_CONTENDERS)}")
    wd = Path(a.workdir) / f"{a.model.replace('/', '')}-{a.image_size}-seed{a.seed}"
    wd.mkdir(parents=True, exist_ok=True)
    w = Work(model=a.model, image_size=a.image_size, batch=a.batch, steps=a.steps, cfg_scale=a.cfg_scale,
             seed=a.seed, repeats=a.repeats, threads=a.threads, workdir=str(wd),
             decoder_backend=a.decoder_backend, omp_wait_policy=a.omp_wait_policy,
             ov_int8=_ov_int8_arg(ap, a.paired_ov_int8), recipe=_recipe_arg(ap, a.recipe, contenders),
             cfg_interval=[int(v) for v in a.cfg_interval.split(",")] if a.cfg_interval else None,
             cache_interval=a.cache_interval)

    from ditdeploy.bench.machine import machine_info
    from ditdeploy.proof import distances

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    info = machine_info()
    results: dict[str, Any] = {}
    if any(c not in ("diffusers", "torch", *LESS_WORK) for c in contenders):
        results["prepare"] = _spawn("prepare" if "ort-int8" in contenders else "prepare-noint8", w, a.timeout)
    if any(c in LESS_WORK for c in contenders):
        results["prepare-pair"] = _spawn("prepare-pair", w, a.timeout)
    if a.paired_ov_int8 == "auto":
        if "prepare" not in results:
            results["prepare"] = _spawn("prepare-noint8", w, a.timeout)
        results["prepare-static-int8"] = _spawn("prepare-static-int8", w, a.timeout)
    for c in contenders:
        results[c] = _spawn(c, w, a.timeout)
    if a.paired:  # the paired run times the dynamic INT8 artifact too: build it whatever the contenders' prepare did
        if "prepare" not in results or not _int8dyn_path(w).exists():
            results["prepare-paired"] = _spawn("prepare", w, a.timeout)
        results["paired"] = _spawn("paired", dataclasses.replace(w, repeats=a.paired), a.timeout)

    # accuracy of the ditdeploy contenders vs the torch eager loop (same weights, noise, sampler)
    ref = results.get("torch", {}).get("latents")
    full = results.get("ort-pair", {}).get("latents") or results.get("ort-fp32", {}).get("latents")
    for c, r in results.items():
        if r.get("latents") and ref and c != "torch":
            a_, b_ = np.load(r["latents"]), np.load(ref)
            r["latent_rel_l2_vs_torch"] = distances.rel_l2(a_, b_)
            r["latent_cosine_vs_torch"] = distances.cosine(a_, b_)
        if r.get("latents") and full and c in ("ort-less", "ov-less", "recipe"):  # latent drift vs full work
            a_, b_ = np.load(r["latents"]), np.load(full)
            r["latent_drift_vs_full_work"] = {"rel_l2": distances.rel_l2(a_, b_), "cosine": distances.cosine(a_, b_)}
    rows = summarize(results, contenders, w.batch)
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = {"created": started, "work": dataclasses.asdict(w), "machine": info, "rows": rows, "raw": results,
           "denoiser_macs_per_sample": int(_config(w).macs())}
    print(format_h2h(out))
    if results.get("paired", {}).get("median_s"):
        pr = results["paired"]
        print(f"interleaved single denoiser calls (batch {pr['call_batch']}), median s: " + ", ".join(
            f"{k} {v:.2f} ({pr['speedup_vs_diffusers'][k]:.2f}x)" for k, v in pr["median_s"].items()))
    if a.out:
        from ditdeploy.artifact.files import write_json_atomic

        write_json_atomic(a.out, out)
    return 0


def _ov_int8_arg(ap: argparse.ArgumentParser, value: str) -> str:
    """``--paired-ov-int8``: '' (none), 'auto' (built in the workdir: resolved by :func:`_ov_int8`), or a file."""
    if value in ("", "auto"):
        return value
    if not Path(value).is_file():
        ap.error(f"--paired-ov-int8 {value}: no such file (pass 'auto' to build it in the workdir, or build one "
                 "with `ditdeploy calibrate` + `ditdeploy export --checkpoint FP32.onnx --precision int8`)")
    return str(Path(value).resolve())


def _ov_int8(w: Work) -> str:
    """The static Q/DQ INT8 artifact of the paired run / ov-int8 contender ('' for none)."""
    return str(_static_int8_path(w)) if w.ov_int8 == "auto" else w.ov_int8


def _recipe_arg(ap: argparse.ArgumentParser, value: str, contenders: list[str]) -> str:
    if "recipe" in contenders and not value:
        ap.error("the recipe contender needs --recipe FILE (from `ditdeploy tune`)")
    if value and not Path(value).is_file():
        ap.error(f"--recipe {value}: no such file")
    return str(Path(value).resolve()) if value else ""


def summarize(results: dict[str, Any], contenders: list[str], batch: int) -> list[dict[str, Any]]:
    """One row per contender: median wall and CPU seconds, speed-ups vs diffusers (wall and CPU), memory, accuracy."""
    def med(r: dict[str, Any], k: str) -> float | None:
        return float(np.median(r[k])) if r.get(k) else None

    base = results.get("diffusers", {})
    base_wall, base_cpu = med(base, "times_s"), med(base, "cpu_s")
    rows = []
    for c in contenders:
        r = results.get(c, {})
        if "times_s" not in r:
            rows.append({"contender": c, "error": r.get("error", "not run")})
            continue
        wall, cpu = med(r, "times_s"), med(r, "cpu_s")
        rows.append({
            "contender": c, "runtime": r["runtime"], "e2e_s_median": wall, "images_per_s": batch / wall,
            "cpu_s_median": cpu, "denoiser_s": med(r, "denoiser_s"), "decoder_s": med(r, "decoder_s"),
            "speedup_vs_diffusers": (base_wall / wall) if base_wall else None,
            "cpu_speedup_vs_diffusers": (base_cpu / cpu) if (base_cpu and cpu) else None,
            "peak_rss_mb": r["peak_rss_mb"], "latent_rel_l2_vs_torch": r.get("latent_rel_l2_vs_torch"),
            "gmac": r.get("gmac"), "cfg_interval": r.get("cfg_interval"), "cache_interval": r.get("cache_interval"),
            "latent_drift_vs_full_work": r.get("latent_drift_vs_full_work"),
            "decoder_bf16_psnr_vs_f32_db": r.get("decoder_bf16_psnr_vs_f32_db"),
        })
    return rows


def format_h2h(out: dict[str, Any]) -> str:
    w = out["work"]
    m = out["machine"]
    lines = [f"{w['model']} {w['image_size']}px, {w['batch']} image(s), {w['steps']} DPM-Solver++ steps, cfg "
             f"{w['cfg_scale']}, SD-VAE decode; {m.get('cpu')} ({m.get('usable_cpus')} cpus, load "
             f"{m.get('load_avg_1_5_15')} -> {m.get('load_avg_end')}); median of {w['repeats']} run(s)",
             f"{'contender':<11} {'e2e s':>8} {'denoiser s':>10} {'decode s':>9} {'x diffusers':>11} "
             f"{'CPU s':>8} {'x (CPU s)':>9} {'RSS MB':>8} {'rel-L2 vs torch':>15}  runtime"]
    for r in out["rows"]:
        if r.get("error"):
            lines.append(f"{r['contender']:<11} error: {r['error']}")
            continue

        def f(v, spec):
            return "-" if v is None else format(v, spec)

        lines.append(f"{r['contender']:<11} {r['e2e_s_median']:>8.1f} {r['denoiser_s']:>10.1f} "
                     f"{f(r['decoder_s'], '.1f'):>9} {f(r['speedup_vs_diffusers'], '.2f'):>11} "
                     f"{f(r.get('cpu_s_median'), '.1f'):>8} {f(r.get('cpu_speedup_vs_diffusers'), '.2f'):>9} "
                     f"{r['peak_rss_mb']:>8.0f} {f(r['latent_rel_l2_vs_torch'], '.2e'):>15}  {r['runtime']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
