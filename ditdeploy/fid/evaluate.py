"""``ditdeploy fid``'s library call: stream samples (and a reference) through a feature extractor -> metrics.

``evaluate(FidRequest(...)) -> dict``: FID and Inception Score always; sFID when the extractor has spatial
features and the reference carries them (``mu_s``/``sigma_s``) or its images; precision / recall when the
reference carries images. A reference with ADM's precomputed ``mu``/``sigma`` is used as published (what ADM's
evaluator does).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.errors import DitDeployError
from ditdeploy.fid.features import Extractor, Features
from ditdeploy.fid.npz import ImageNpz
from ditdeploy.fid.stats import InceptionScore, RunningStats, frechet_distance, precision_recall

__all__ = ["DIGITS_REF", "FidRequest", "evaluate"]

DIGITS_REF = "digits"
DEFAULT_BATCH = 50


@dataclass
class FidRequest:
    """What to compare: ``samples`` (ADM-layout npz) against ``ref`` (an npz path or ``"digits"``)."""

    samples: Path
    ref: str | Path
    inception: Path | None = None
    batch_size: int = DEFAULT_BATCH
    device: str = "auto"
    precision_recall: bool = True
    split_size: int = 5000
    progress: bool = True
    extractor: str = "auto"  # auto (digits for --ref digits, else inception) | inception | digits


@dataclass
class _Acc:
    """Per-set accumulators over a feature stream."""

    pool: RunningStats = field(default_factory=RunningStats)
    spatial: RunningStats = field(default_factory=RunningStats)
    isc: InceptionScore | None = None
    keep: list[np.ndarray] | None = None

    def add(self, f: Features) -> None:
        self.pool.add(f.pool)
        if f.spatial is not None:
            self.spatial.add(f.spatial)
        if self.isc is not None:
            self.isc.add(f.probs)
        if self.keep is not None:
            self.keep.append(np.asarray(f.pool, dtype=np.float32))


def _progress(it: Iterable[np.ndarray], total: int, desc: str, on: bool) -> Iterator[np.ndarray]:
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="img", disable=not on, file=sys.stderr, leave=False) as bar:
        for b in it:
            yield b
            bar.update(len(b))


def _stream(extractor: Extractor, batches: Iterable[np.ndarray], total: int, acc: _Acc, desc: str,
            on: bool) -> None:
    for b in _progress(batches, total, desc, on):
        acc.add(extractor(b))


def _check_shapes(samples: tuple[int, ...], ref: tuple[int, ...] | None, required: tuple[int, ...] | None,
                  ref_name: str) -> None:
    """One-line errors for too few samples or images of another size / channel count than the reference's."""
    if samples[0] < 2:
        raise DitDeployError(f"need at least 2 samples to estimate a covariance, got {samples[0]}")
    hwc = "x".join(map(str, samples[1:]))
    if required is not None and tuple(samples[1:]) != tuple(required):
        raise DitDeployError(f"samples are {hwc} (HxWxC) but {ref_name} compares {'x'.join(map(str, required))} "
                             f"images")
    if ref is not None and tuple(ref[1:]) != tuple(samples[1:]):
        raise DitDeployError(f"the reference images are {'x'.join(map(str, ref[1:]))} (HxWxC) but the samples are "
                             f"{hwc}: compare at one resolution and channel count")


def _batches(u8: np.ndarray, bs: int) -> Iterator[np.ndarray]:
    for i in range(0, len(u8), bs):
        yield u8[i : i + bs]


def _extractor_kind(req: FidRequest) -> str:
    kind = req.extractor
    if kind not in ("auto", "inception", "digits"):
        raise DitDeployError(f"--extractor takes auto, inception or digits, got {kind!r}")
    if str(req.ref) == DIGITS_REF and kind == "inception":
        raise DitDeployError("--ref digits is scored with the digits extractor: drop --extractor inception")
    if kind == "auto":
        kind = "digits" if str(req.ref) == DIGITS_REF else "inception"
    if kind == "digits" and req.inception is not None:
        raise DitDeployError("--inception does not apply to the digits extractor (it is trained in-process)")
    return kind


def _check_memory(req: FidRequest, n_samples: int, ref: ImageNpz | None) -> None:
    """Precision / recall keep every feature row of both sets: their memory, from the npz headers, before any work."""
    from ditdeploy.fid.digits import N_REAL
    from ditdeploy.fid.stats import precision_recall_bytes
    from ditdeploy.system.bounds import check_memory

    n_ref = N_REAL if ref is None else len(ref)
    if req.precision_recall and n_ref:
        check_memory(1, precision_recall_bytes(n_ref, n_samples), f"precision/recall over {n_samples} samples and "
                     f"{n_ref} reference images", "pass --no-pr or score fewer samples")


def _reference(req: FidRequest, samples_shape: tuple[int, ...]):
    """(extractor, reference description, in-memory reference images or None, reference ImageNpz or None)."""
    kind = _extractor_kind(req)
    ref = None if str(req.ref) == DIGITS_REF else ImageNpz(req.ref, "reference")
    _check_memory(req, samples_shape[0], ref)
    if ref is not None and not ref.has_images and not {"mu", "sigma"} <= ref.members:
        raise DitDeployError(f"reference {ref.path} has neither arr_0 images nor precomputed mu/sigma")
    if kind == "digits":
        from ditdeploy.fid.digits import IMAGE_SHAPE, digits_extractor, real_digits_u8

        _check_shapes(samples_shape, ref.shape if ref is not None else None, IMAGE_SHAPE, "the digits extractor")
        real = real_digits_u8()[0] if ref is None else None
        info = {"name": DIGITS_REF, "what": "all 1797 scikit-learn digits"} if ref is None else {"name": str(ref.path)}
        return digits_extractor(), info, real, ref
    _check_shapes(samples_shape, ref.shape, None, f"reference {ref.path.name}")
    from ditdeploy.fid.inception import load_inception

    return load_inception(req.inception, device=req.device), {"name": str(ref.path)}, None, ref


def _ref_stats(ref: ImageNpz | None, acc: _Acc | None) -> tuple[tuple | None, tuple | None, str]:
    """((mu, sigma), (mu_s, sigma_s) or None, where they came from)."""
    if ref is not None and {"mu", "sigma"} <= ref.members:
        spatial = ref.gaussian("mu_s", "sigma_s") if {"mu_s", "sigma_s"} <= ref.members else None
        if spatial is None and acc is not None and acc.spatial.n >= 2:
            spatial = (acc.spatial.mu, acc.spatial.sigma)
        return ref.gaussian("mu", "sigma"), spatial, "precomputed mu/sigma in the reference file"
    assert acc is not None
    spatial = (acc.spatial.mu, acc.spatial.sigma) if acc.spatial.n >= 2 else None
    return (acc.pool.mu, acc.pool.sigma), spatial, f"computed from {acc.pool.n} reference images"


def _need_ref_images(req: FidRequest, ref: ImageNpz | None, ext: Extractor) -> bool:
    if ref is None:
        return True
    if not ref.has_images:
        return False
    if req.precision_recall or not {"mu", "sigma"} <= ref.members:
        return True
    return ext.has_spatial and not {"mu_s", "sigma_s"} <= ref.members


def _validate(req: FidRequest) -> None:
    if req.batch_size < 1:
        raise DitDeployError(f"--batch-size must be >= 1, got {req.batch_size}")
    if req.split_size < 1:
        raise DitDeployError(f"--split-size must be >= 1, got {req.split_size}")


def evaluate(req: FidRequest) -> dict[str, Any]:
    """Compute the metrics; returns the JSON report (also printed by the CLI)."""
    t0 = time.perf_counter()
    _validate(req)
    samples = ImageNpz(req.samples, "samples")
    shape = samples.require_images()
    ext, ref_info, real_u8, ref = _reference(req, shape)
    ref_images = ref is None or ref.has_images
    want_pr = req.precision_recall and ref_images
    s_acc = _Acc(isc=InceptionScore(req.split_size), keep=[] if want_pr else None)
    _stream(ext, samples.batches(req.batch_size), len(samples), s_acc, "samples", req.progress)
    r_acc = None
    if _need_ref_images(req, ref, ext):
        r_acc = _Acc(keep=[] if want_pr else None)
        src = _batches(real_u8, req.batch_size) if ref is None else ref.batches(req.batch_size)
        _stream(ext, src, len(real_u8) if ref is None else len(ref), r_acc, "reference", req.progress)
        ref_info["count"] = r_acc.pool.n
    (mu, sigma), spatial, origin = _ref_stats(ref, r_acc)
    ref_info["stats"] = origin
    metrics: dict[str, Any] = {"fid": frechet_distance(s_acc.pool.mu, s_acc.pool.sigma, mu, sigma),
                               "inception_score": s_acc.isc.result(), "is_splits": len(s_acc.isc.scores)}
    if spatial is not None and s_acc.spatial.n >= 2:
        metrics["sfid"] = frechet_distance(s_acc.spatial.mu, s_acc.spatial.sigma, *spatial)
    if want_pr and r_acc is not None:
        p, r = precision_recall(np.concatenate(r_acc.keep), np.concatenate(s_acc.keep))
        metrics.update(precision=p, recall=r)
    from ditdeploy import __version__

    return {"samples": {"path": str(samples.path), "count": s_acc.pool.n, "image_shape": list(shape[1:])},
            "reference": ref_info, "extractor": ext.describe(), "metrics": metrics, "batch_size": req.batch_size,
            "seconds": time.perf_counter() - t0, "ditdeploy": __version__}
