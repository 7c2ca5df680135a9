"""INT8 quality on the digits model: INT8 samples vs fp32 samples from the same seeds, and per-timestep error curves.

For an fp32 denoiser ONNX and its INT8 version(s):

- samples: ``n_per_class`` images per class from both models with identical initial noise, labels and sampler
  (DDIM, guidance ``cfg_scale``) on ONNX Runtime CPU;
- classifier: the digits bench's SVC (``experiments.digits_quality``: RBF, gamma 0.001, C 1, trained on the
  preset's training split); reports the accuracy on fp32 samples, on INT8 samples, the drop (points), and how often
  the two predictions agree;
- PSNR / SSIM of INT8 samples against the fp32 samples (pixel scale 0..16, like the classifier's input);
- per-timestep error curve: cosine and rel-L2 of the INT8 model's output vs the fp32 model's on the calibration
  set's held-out validation inputs, grouped by t (JSON + PNG).

Run (the shipped model; builds what it needs in a scratch folder unless given)::

    python -m experiments.int8_quality [--fp32 digits.onnx --calibration calib.npz] [--json out.json] [--png]

Without ``--fp32`` it exports the shipped ``digits.safetensors`` (or ``--random-weights``) to ONNX, captures a
calibration set, quantizes static (int8 symmetric, TensorRT-ready) and dynamic, and compares all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

GOAL_ACC_DROP = 0.03  # the acceptance: classifier accuracy drop <= 3 points


def _pixels(x: np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(x, dtype=np.float64).reshape(len(x), -1) + 1.0) / 2.0 * 16.0, 0.0, 16.0)


def _sample(path: str | os.PathLike, noise: np.ndarray, labels: np.ndarray, *, steps: int, cfg_scale: float,
            threads: int | None) -> tuple[np.ndarray, float]:
    from ditdeploy.diffusion import sample
    from ditdeploy.runtimes import load

    den = load(path, threads=threads)
    t0 = time.perf_counter()
    x = sample(den, noise, labels, method="ddim", steps=steps, cfg_scale=cfg_scale,
               num_classes=den.config.num_classes)
    return x, time.perf_counter() - t0


def compare_samples(fp32: str | os.PathLike, int8: str | os.PathLike, *, n_per_class: int = 20, steps: int = 25,
                    cfg_scale: float = 3.0, seed: int = 0, threads: int | None = None,
                    classifier: Any = None) -> dict[str, Any]:
    """Sample both models from the same seeds and compare them through the digits classifier."""
    from ditdeploy.proof import distances
    from ditdeploy.runtimes import load
    from experiments.digits_quality import fit_classifier, real_digits

    cfg = load(fp32, threads=threads).config
    labels = np.repeat(np.arange(cfg.num_classes, dtype=np.int64), n_per_class)
    noise = np.random.default_rng(seed).standard_normal(
        (len(labels), cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
    if classifier is None:
        classifier, clf_acc = fit_classifier(real_digits())
    else:
        clf_acc = None
    xf, sf = _sample(fp32, noise, labels, steps=steps, cfg_scale=cfg_scale, threads=threads)
    xq, sq = _sample(int8, noise, labels, steps=steps, cfg_scale=cfg_scale, threads=threads)
    pf, pq = _pixels(xf), _pixels(xq)
    yf, yq = classifier.predict(pf), classifier.predict(pq)
    acc_f, acc_q = float((yf == labels).mean()), float((yq == labels).mean())
    return {
        "samples": int(len(labels)), "steps": steps, "cfg_scale": cfg_scale, "seed": seed, "sampler": "ddim",
        "classifier_heldout_accuracy": clf_acc,
        "accuracy_fp32": acc_f, "accuracy_int8": acc_q, "accuracy_drop_points": 100.0 * (acc_f - acc_q),
        "agreement": float((yf == yq).mean()),
        "psnr_db": distances.psnr(pq, pf, data_range=16.0),
        "ssim": distances.ssim(pq.reshape(-1, 8, 8), pf.reshape(-1, 8, 8), data_range=16.0, win=7),
        "sample_rel_l2": distances.rel_l2(xq, xf),
        "sampling_s": {"fp32": round(sf, 3), "int8": round(sq, 3)},
    }


def timestep_curve(fp32: str | os.PathLike, int8: str | os.PathLike, calibration: str | os.PathLike,
                   threads: int | None = None) -> dict[str, Any]:
    """Per-timestep cosine / rel-L2 of ``int8`` vs ``fp32`` on the calibration set's held-out validation inputs."""
    from ditdeploy.calibration.capture import load_calibration
    from ditdeploy.calibration.report import error_curve
    from ditdeploy.runtimes import load

    val = load_calibration(calibration).validation()
    return error_curve(load(fp32, threads=threads), load(int8, threads=threads), val["x"], val["t"], val["y"],
                       batch_size=64)


def _prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path, str]:
    """fp32 ONNX + calibration set: given, or exported/captured from the shipped (or random) digits model."""
    from ditdeploy.calibration.capture import CaptureSettings, capture_calibration_set
    from ditdeploy.runtimes import load

    if args.fp32:
        fp32 = Path(args.fp32)
        what = f"given {fp32.name}"
    else:
        from ditdeploy.export.onnx import export_denoiser_onnx

        if args.random_weights:
            from ditdeploy.export.randomize import random_model

            model, what = random_model("digits", seed=0), "RANDOM-weight digits-config model (seed 0)"
        else:
            from ditdeploy.sources import shipped
            from ditdeploy.sources.checkpoints import load_model

            p = shipped.DIGITS_CHECKPOINT
            if not p.exists():
                raise SystemExit(f"{p} does not exist yet: pass --random-weights or --fp32")
            model, what = load_model(p), f"shipped {p.name}"
        fp32 = work / "digits-fp32.onnx"
        export_denoiser_onnx(model, fp32)
    if args.calibration:
        calib = Path(args.calibration)
    else:
        calib = work / "calib.npz"
        capture_calibration_set(load(fp32, threads=args.threads), calib,
                                CaptureSettings(samples=args.calib_samples, steps=args.steps,
                                                cfg_scale=args.cfg_scale, val_samples=8),
                                progress=sys.stderr.isatty())
    return fp32, calib, what


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", help="fp32 denoiser ONNX (default: export the shipped digits model)")
    ap.add_argument("--calibration", help="calibration .npz with a validation part (default: capture one)")
    ap.add_argument("--random-weights", action="store_true", help="use a random digits-config model")
    ap.add_argument("--n-per-class", type=int, default=20)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default="bench/results/int8_quality.json")
    ap.add_argument("--png", default="bench/results/int8_quality_timesteps.png")
    a = ap.parse_args(argv)

    from ditdeploy.artifact.files import write_json_atomic
    from ditdeploy.calibration.quantize import quantize_int8
    from ditdeploy.calibration.report import plot_error_curves, summarize_curve
    from experiments.digits_quality import fit_classifier, real_digits

    with tempfile.TemporaryDirectory(prefix="int8-quality-") as tmp:
        work = Path(tmp)
        fp32, calib, what = _prepare(a, work)
        clf, clf_acc = fit_classifier(real_digits())
        variants = {
            "static int8 (Q/DQ, int8 sym. act., percentile 99.99)": dict(mode="static"),
            "static int8 (Q/DQ, entropy)": dict(mode="static", calibrate_method="entropy"),
            "static uint8 act. (Q/DQ, ORT CPU only)": dict(mode="static", activations="uint8"),
            "dynamic int8 (ORT CPU)": dict(mode="dynamic"),
        }
        results: dict[str, Any] = {}
        curves: dict[str, Any] = {}
        for i, (name, kw) in enumerate(variants.items()):
            out = work / f"int8-{i}.onnx"
            m = quantize_int8(fp32, out, calib, progress=False, **kw)
            cmp = compare_samples(fp32, out, n_per_class=a.n_per_class, steps=a.steps, cfg_scale=a.cfg_scale,
                                  seed=a.seed, threads=a.threads, classifier=clf)
            curve = timestep_curve(fp32, out, calib, threads=a.threads)
            curves[name] = curve
            results[name] = {**cmp, "meets_goal": cmp["accuracy_drop_points"] <= 100 * GOAL_ACC_DROP,
                             "per_call": curve["overall"], **summarize_curve(curve),
                             "per_timestep": curve["per_timestep"],
                             "quantized_nodes": m["int8"]["quantized_nodes"],
                             "excluded": m["int8"]["excluded_roles"]}
            print(f"{name}: accuracy fp32 {cmp['accuracy_fp32']:.3f} int8 {cmp['accuracy_int8']:.3f} "
                  f"(drop {cmp['accuracy_drop_points']:+.1f} pts), agreement {cmp['agreement']:.3f}, "
                  f"PSNR {cmp['psnr_db']:.1f} dB, per-call cosine min {curve['overall']['per_call_cosine_min']:.5f}",
                  flush=True)
        from ditdeploy.bench.machine import machine_info

        report = {"model": what, "classifier_heldout_accuracy": clf_acc, "goal_accuracy_drop_points": 3.0,
                  "calibration": json.loads((calib.parent / (calib.name + ".json")).read_text()).get("counts"),
                  "machine": machine_info(), "results": results,
                  "command": "python -m experiments.int8_quality " + " ".join(argv or sys.argv[1:])}
        if a.json:
            write_json_atomic(a.json, report)
            print(f"wrote {a.json}")
        if a.png:
            plot_error_curves(curves, a.png, title=f"INT8 vs fp32 per timestep ({what})")
            print(f"wrote {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
