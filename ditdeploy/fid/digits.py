"""An offline FID for 8x8 digits: a small feature network trained in-process on scikit-learn's bundled digits.

Nothing is downloaded: ``--ref digits`` trains this network (numpy, float64, a second or two), then compares sample
features with those of all 1797 real digits. Everything is fixed, so every run on the same numpy/BLAS gives the
same weights bit for bit (their sha256 goes into the report):

- input: uint8 (N, 8, 8, 1) images, as ``ditdeploy sample --npz`` writes them, scaled to [0, 1] (64 values); the
  real digits (0..16) pass through the same conversion the samples do (``[-1, 1]`` then ``images.to_uint8``);
- network: 64 -> 128 (ReLU) -> 64 (tanh: the feature layer, no dead units) -> 10 (softmax: IS and accuracy);
- training: the digits preset's 1500-image training split (the held-out 297 stay unseen), full-batch Adam
  (lr 1e-2, betas 0.9/0.999), ``STEPS`` steps, L2 1e-4 on weights, cross-entropy; initialisation from
  ``default_rng(SEED)`` (scaled normal, zero biases); BLAS limited to one thread while training (threadpoolctl, a
  scikit-learn dependency), which is faster for these small matrices and keeps the summation order fixed.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from ditdeploy.errors import DitDeployError
from ditdeploy.fid.features import Features

__all__ = ["DigitsExtractor", "digits_extractor", "real_digits_u8"]

NAME = "digits-mlp-v1"
SEED = 0
STEPS = 300
LR = 1e-2
L2 = 1e-4
SIZES = (64, 128, 64, 10)
IMAGE_SHAPE = (8, 8, 1)


N_REAL = 1797  # scikit-learn's digits


def real_digits_u8() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 real digits as uint8 (N, 8, 8, 1) through the samples' conversion, and their labels."""
    from ditdeploy.errors import MissingDependencyError
    from ditdeploy.run.images import to_uint8

    try:
        from ditdeploy.training.data import digits_arrays
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("scikit-learn", "train", "--ref digits") from e
    x, y = digits_arrays()
    return to_uint8(x), y


def _inputs(u8: np.ndarray) -> np.ndarray:
    return np.asarray(u8, dtype=np.float64).reshape(len(u8), -1) / 255.0


def _forward(params: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hidden ReLU, tanh features, logits)."""
    w1, b1, w2, b2, w3, b3 = params
    h = np.maximum(x @ w1 + b1, 0.0)
    f = np.tanh(h @ w2 + b2)
    return h, f, f @ w3 + b3


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _grads(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Gradients of mean cross-entropy + L2 on weights."""
    w1, _, w2, _, w3, _ = params
    h, f, z = _forward(params, x)
    dz = _softmax(z)
    dz[np.arange(len(y)), y] -= 1.0
    dz /= len(y)
    df = (dz @ w3.T) * (1.0 - f * f)
    dh = (df @ w2.T) * (h > 0)
    return [x.T @ dh + L2 * w1, dh.sum(0), h.T @ df + L2 * w2, df.sum(0), f.T @ dz + L2 * w3, dz.sum(0)]


def _train(x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    rng = np.random.default_rng(SEED)
    params: list[np.ndarray] = []
    for a, b in zip(SIZES[:-1], SIZES[1:], strict=False):
        params += [rng.standard_normal((a, b)) * np.sqrt(2.0 / a), np.zeros(b)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for step in range(1, STEPS + 1):
        for i, g in enumerate(_grads(params, x, y)):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            params[i] -= LR * (m[i] / (1 - 0.9**step)) / (np.sqrt(v[i] / (1 - 0.999**step)) + 1e-8)
    return params


class DigitsExtractor:
    """The trained digits network as a feature extractor for uint8 (N, 8, 8, 1) batches."""

    name = NAME
    image_shape = IMAGE_SHAPE
    has_spatial = False

    def __init__(self, params: list[np.ndarray], heldout_accuracy: float):
        self.params = params
        self.heldout_accuracy = heldout_accuracy
        h = hashlib.sha256()
        for p in params:
            h.update(np.ascontiguousarray(p, dtype="<f8").tobytes())
        self.weights_sha256 = h.hexdigest()

    def __call__(self, u8: np.ndarray) -> Features:
        if tuple(u8.shape[1:]) != IMAGE_SHAPE:
            raise DitDeployError(f"the digits extractor takes (N, 8, 8, 1) images, got {tuple(u8.shape)}")
        _, f, z = _forward(self.params, _inputs(u8))
        return Features(pool=f, probs=_softmax(z))

    def describe(self) -> dict[str, object]:
        return {"name": NAME, "weights": "trained in-process (ditdeploy.fid.digits)", "sha256": self.weights_sha256,
                "feature_dim": SIZES[2], "classes": SIZES[3], "seed": SEED, "steps": STEPS,
                "heldout_accuracy": self.heldout_accuracy}


@lru_cache(maxsize=1)
def digits_extractor() -> DigitsExtractor:
    """Train (once per process) and return the digits feature extractor."""
    from ditdeploy.training.data import digits_split

    u8, y = real_digits_u8()
    tr, te = digits_split()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        params = _train(_inputs(u8[tr]), y[tr])
    else:
        with threadpool_limits(limits=1, user_api="blas"):
            params = _train(_inputs(u8[tr]), y[tr])
    acc = float((_forward(params, _inputs(u8[te]))[2].argmax(1) == y[te]).mean())
    return DigitsExtractor(params, acc)
