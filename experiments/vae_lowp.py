"""The VAE decoder in lower precision on CPU: fp32 vs OpenVINO bf16 vs static INT8 (``calibration.vae_int8``).

Calibration and validation latents come from real sampling runs of ``--denoiser`` (DPM-Solver++, cfg 4; calibration
seed 0, validation seed 1, different noise). Every decoder is timed round-robin in one process on the same validation
latent (batch 1), so load changes of a shared machine hit all alike; accuracy is the PSNR of decoded images (0..255)
against the fp32 decoder on ONNX Runtime.

Run: ``python -m experiments.vae_lowp --decoder vae-decoder.onnx --denoiser dit-pair.onnx --json FILE``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def sampled_latents(denoiser: str, n: int, seed: int, steps: int) -> np.ndarray:
    """x_0 latents of ``n`` images sampled with ``denoiser`` (labels spread over the classes)."""
    from ditdeploy.diffusion import sample
    from ditdeploy.runtimes import load

    den = load(denoiser)
    c = den.config
    noise = np.random.default_rng(seed).standard_normal((n, c.in_channels, c.input_size, c.input_size))
    labels = (np.arange(n) * 97 + seed) % c.num_classes
    return sample(den, noise.astype(np.float32), labels, method="dpm-solver++", steps=steps, cfg_scale=4.0,
                  num_classes=c.num_classes)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    from ditdeploy.proof import distances

    return float(distances.psnr((np.clip(a, -1, 1) + 1) * 127.5, (np.clip(b, -1, 1) + 1) * 127.5, 255.0))


def run(decoder: Path, denoiser: str, n_calib: int, n_val: int, steps: int, repeats: int) -> dict[str, Any]:
    from ditdeploy.runtimes import load_decoder
    from experiments.vae_int8 import quantize_decoder_int8

    calib = sampled_latents(denoiser, n_calib, 0, steps)
    val = sampled_latents(denoiser, n_val, 1, steps)
    q = decoder.with_name(decoder.stem + "-int8.onnx")
    t0 = time.perf_counter()
    man = quantize_decoder_int8(decoder, q, calib, val, source=f"{Path(denoiser).name} dpm-solver++ {steps} cfg 4",
                                min_psnr_db=0.0)
    quant_s = time.perf_counter() - t0
    decs = {"ort-f32": load_decoder(decoder, backend="onnxruntime"),
            "ov-f32": load_decoder(decoder, backend="openvino", precision_hint="f32"),
            "ov-bf16": load_decoder(decoder, backend="openvino", precision_hint="bf16"),
            "ort-int8": load_decoder(q, backend="onnxruntime"),
            "ov-int8": load_decoder(q, backend="openvino", precision_hint="f32")}
    z = val[:1]
    ref = decs["ort-f32"](val)
    psnr = {k: (_psnr(d(val), ref) if k != "ort-f32" else None) for k, d in decs.items()}
    times: dict[str, list[float]] = {k: [] for k in decs}
    order = list(decs)
    for rnd in range(repeats + 1):
        for k in order[rnd % len(order):] + order[: rnd % len(order)]:
            t0 = time.perf_counter()
            decs[k](z)
            if rnd:
                times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"decoder": str(decoder), "latent_shape": list(z.shape), "calibration_latents": n_calib,
            "val_latents": n_val, "int8_quantize_s": quant_s, "int8_manifest_parity": man["parity"],
            "times_s": times, "median_s": med, "speedup_vs_ov_f32": {k: med["ov-f32"] / v for k, v in med.items()},
            "psnr_vs_fp32_db": psnr}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoder", required=True, help="fp32 VAE decoder ONNX (ditdeploy export)")
    ap.add_argument("--denoiser", required=True, help="denoiser artifact whose samples calibrate/validate")
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--n-val", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = run(Path(a.decoder), a.denoiser, a.n_calib, a.n_val, a.steps, a.repeats)
    from ditdeploy.bench.machine import machine_info

    res["machine"] = machine_info()
    for k, v in res["median_s"].items():
        p = res["psnr_vs_fp32_db"][k]
        print(f"{k:9s} {v:7.3f} s  {res['speedup_vs_ov_f32'][k]:.2f}x ov-f32  PSNR vs fp32 "
              f"{'-' if p is None else f'{p:.1f} dB'}")
    if a.json:
        from ditdeploy.artifact.files import write_json_atomic

        write_json_atomic(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
