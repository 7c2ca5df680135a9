"""Quality of the digits model: are guided samples the digits they were asked for, diverse, and not copies?

- Classifier: an SVC (RBF, gamma=0.001, C=1) on the digits preset's training split (pixel values 0..16); its
  accuracy on the held-out split is reported as the classifier's own quality.
- Samples: ``n_per_class`` per class for all 10 classes from the model (``ditdeploy.diffusion.sample`` over a numpy
  wrapper of the torch model), classifier-free guidance ``cfg_scale``; decoded to 8x8 pixel values
  ``clip((x + 1) / 2 * 16, 0, 16)``.
- Accuracy: fraction classified as the requested label (overall and per class).
- Diversity: per class, the mean per-pixel std across samples and the mean pairwise L2 distance, averaged over
  classes; the same for the real held-out digits (ratios near 1 = real-like spread; near 0 = mode collapse).
- Memorisation: L2 distance (pixel units 0..16, 64 pixels) of each sample to its nearest training image, against
  the same for the real held-out digits (which the model never saw); exact copies would give ~0.

Run: ``python -m experiments.digits_quality [--model PATH] [--n-per-class 10] [--cfg-scale 3] [--steps 25]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SVC_PARAMS = {"gamma": 0.001, "C": 1.0}


def _to_pixels(x: np.ndarray) -> np.ndarray:
    """[-1, 1] images (N, 1, 8, 8) -> (N, 64) digit pixel values in [0, 16]."""
    return np.clip((np.asarray(x, dtype=np.float64).reshape(len(x), -1) + 1.0) / 2.0 * 16.0, 0.0, 16.0)


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def _spread(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean per-pixel std within class, mean pairwise distance within class), averaged over classes."""
    stds, pds = [], []
    for c in np.unique(y):
        xc = x[y == c]
        stds.append(xc.std(axis=0).mean())
        d = _pairwise(xc, xc)
        n = len(xc)
        pds.append(d.sum() / (n * (n - 1)) if n > 1 else 0.0)
    return float(np.mean(stds)), float(np.mean(pds))


def real_digits() -> dict[str, np.ndarray]:
    """Train / held-out pixel features (0..16) and labels of the digits preset's fixed split."""
    from ditdeploy.training.data import digits_arrays, digits_split

    x, y = digits_arrays()
    tr, te = digits_split()
    px = _to_pixels(x)
    return {"x_train": px[tr], "y_train": y[tr], "x_test": px[te], "y_test": y[te]}


def fit_classifier(real: dict[str, np.ndarray]):
    """SVC on the training split; returns (classifier, held-out accuracy)."""
    from sklearn.svm import SVC

    clf = SVC(**SVC_PARAMS).fit(real["x_train"], real["y_train"])
    return clf, float((clf.predict(real["x_test"]) == real["y_test"]).mean())


def generate(model_path: str | Path | None, n_per_class: int, cfg_scale: float, method: str, steps: int,
             seed: int, threads: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(samples in [-1, 1] (N, 1, 8, 8), labels, seconds) from the model at ``model_path`` (default: shipped)."""
    from ditdeploy.diffusion import sample
    from ditdeploy.runtimes.torch import TorchDenoiser
    from ditdeploy.sources import shipped
    from ditdeploy.sources.checkpoints import load_model

    path = Path(model_path) if model_path else shipped.DIGITS_CHECKPOINT
    model = load_model(path)
    den = TorchDenoiser.from_model(model, threads=threads)
    cfg = model.config
    labels = np.repeat(np.arange(cfg.num_classes, dtype=np.int64), n_per_class)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((len(labels), cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
    t0 = time.perf_counter()
    x = sample(den, noise, labels, method=method, steps=steps, cfg_scale=cfg_scale, num_classes=cfg.num_classes,
               rng=rng)
    return x, labels, time.perf_counter() - t0


def evaluate(model_path: str | Path | None = None, n_per_class: int = 10, cfg_scale: float = 3.0,
             method: str = "ddim", steps: int = 25, seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """All numbers of the module docstring, as a dict."""
    real = real_digits()
    clf, clf_acc = fit_classifier(real)
    x, labels, secs = generate(model_path, n_per_class, cfg_scale, method, steps, seed, threads)
    px = _to_pixels(x)
    pred = clf.predict(px)
    per_class = {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}
    # a real comparison set of the same size per class, from the held-out split
    rng = np.random.default_rng(seed)
    take = np.concatenate([rng.choice(np.flatnonzero(real["y_test"] == c), size=min(n_per_class, int((real["y_test"] == c).sum())), replace=False)
                           for c in np.unique(labels)])
    s_std, s_pd = _spread(px, labels)
    r_std, r_pd = _spread(real["x_test"][take], real["y_test"][take])
    nn_s = _pairwise(px, real["x_train"]).min(axis=1)
    nn_r = _pairwise(real["x_test"], real["x_train"]).min(axis=1)
    return {
        "samples": len(labels), "method": method, "steps": steps, "cfg_scale": cfg_scale, "seed": seed,
        "sampling_s": secs,
        "classifier_heldout_accuracy": clf_acc,
        "accuracy": float((pred == labels).mean()), "per_class_accuracy": per_class,
        "within_class_pixel_std": {"samples": s_std, "real": r_std, "ratio": s_std / r_std},
        "within_class_pairwise_l2": {"samples": s_pd, "real": r_pd, "ratio": s_pd / r_pd},
        "nn_l2_to_train": {"samples_median": float(np.median(nn_s)), "samples_min": float(nn_s.min()),
                           "real_heldout_median": float(np.median(nn_r)), "real_heldout_min": float(nn_r.min()),
                           "ratio_median": float(np.median(nn_s) / np.median(nn_r)),
                           "samples_below_1": int((nn_s < 1.0).sum())},
        "pixel_scale": "0..16 per pixel, 64 pixels",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="digits checkpoint (default: the shipped assets/digits.safetensors)")
    ap.add_argument("--n-per-class", type=int, default=10)
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--method", default="ddim")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args(argv)
    res = evaluate(a.model, a.n_per_class, a.cfg_scale, a.method, a.steps, a.seed, a.threads)
    from ditdeploy.bench.machine import machine_info

    res["machine"] = machine_info()  # CPU, ISA flags (cpu_isa) and load, as in every result file
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        from ditdeploy.artifact.files import write_bytes_atomic

        write_bytes_atomic(a.json, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
