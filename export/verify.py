"""Parity at export: run the freshly written ONNX file on ONNX Runtime CPU and compare it with the torch model.

The inputs are ``ditdeploy.parity.probe_inputs`` (seeded; both CFG halves; timesteps over 0..999), one
``session.run`` per batch size on the same file, so the dynamic batch dimension is exercised too. The gates are the
per-call rows of ``ditdeploy.parity.THRESHOLDS`` (:func:`tolerance_for`); the numbers come from
``ditdeploy.parity.compare``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.errors import NumericsError
from ditdeploy.parity import compare


def ort_session(path: str | os.PathLike, threads: int | None = None, int8_exact: bool = False):
    """An ONNX Runtime CPU session for ``path`` with ORT's default settings (``runtimes.onnxruntime.make_session``;
    ``int8_exact``: no int16 saturation of int8 GEMMs on CPUs without VNNI)."""
    from ditdeploy.runtimes.onnxruntime import make_session

    return make_session(path, threads=threads, int8_exact=int8_exact)


def check_parity(
    onnx_path: str | os.PathLike,
    reference: Callable[[dict[str, np.ndarray]], np.ndarray],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    tolerance: dict[str, float] | None = None,
    output: str | None = None,
    what: str = "ONNX",
    after_reference: Callable[[], None] | None = None,
    run: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Run every feed through ORT and ``reference``; return per-batch metrics; raise NumericsError on failure.

    All reference outputs are computed first; ``after_reference`` (e.g. freeing the torch model) runs before the
    ORT session is created, so the two never need to be in memory together. ``run`` replaces the ORT session (other
    artifact formats, e.g. the AOTInductor ``.pt2``, use the same inputs and checks).

    The returned dict (the manifest's ``parity``) holds ``backend``, ``reference``, ``tolerance``, ``batches`` (one
    entry per feed with batch size, timesteps, labels, rel_l2, cosine, max_abs, finite) and the worst values.
    """
    refs = [np.asarray(reference(feed), dtype=np.float32) for feed in feeds]
    if after_reference is not None:
        after_reference()
    sess = ort_session(onnx_path) if run is None else None
    names = [i.name for i in sess.get_inputs()] if sess is not None else []
    batches = []
    for feed, ref in zip(feeds, refs, strict=True):
        if sess is None:
            got = np.asarray(run(feed))
        else:
            got = sess.run([output] if output else None, {k: feed[k] for k in names})[0]
        if got.shape != ref.shape:
            raise NumericsError(f"{what} output shape {got.shape} != torch {ref.shape}: the exported graph is wrong")
        entry = {"batch": int(next(iter(feed.values())).shape[0]), **compare(got, ref).metrics(),
                 "reference_rms": float(np.sqrt(np.mean(np.square(ref, dtype=np.float64))))}
        for k in ("t", "y"):
            if k in feed:
                entry[k] = feed[k].tolist()
        batches.append(entry)
    del sess
    tol = tolerance or {}
    worst = {
        "rel_l2": max(b["rel_l2"] for b in batches),
        "cosine": min(b["cosine"] for b in batches),
        "max_abs": max(b["max_abs"] for b in batches),
    }
    result = {"backend": "onnxruntime-cpu", "reference": "torch-fp32", "tolerance": tol, "batches": batches,
              "worst": worst, "passed": True}
    if all(b["reference_rms"] == 0.0 for b in batches):
        # an untrained adaLN-Zero DiT outputs exactly 0: the comparison then proves nothing about the blocks
        result["note"] = "reference output is all zeros (untrained zero-initialised model?): parity is trivial"
        warnings.warn(f"{what}: the reference output is all zeros, so the parity check is trivial", stacklevel=2)
    bad = [b for b in batches if not b["finite"]]
    if bad:
        raise NumericsError(f"{what} produced NaN/Inf at batch {bad[0]['batch']}: export failed verification")
    if "rel_l2" in tol and worst["rel_l2"] > tol["rel_l2"]:
        raise NumericsError(
            f"{what} differs from torch: rel-L2 {worst['rel_l2']:.3g} > tolerance {tol['rel_l2']:g} "
            f"(cosine {worst['cosine']:.6f}); nothing was written"
        )
    if "cosine" in tol and worst["cosine"] < tol["cosine"]:
        raise NumericsError(
            f"{what} differs from torch: cosine {worst['cosine']:.6f} < {tol['cosine']}; nothing was written"
        )
    return result


def torch_reference(module: Any, names: Sequence[str] = ("x", "t", "y")) -> Callable[[dict], np.ndarray]:
    """Wrap a torch module taking ``names`` positionally into a feed -> numpy function (fp32, no grad)."""
    import torch

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            out = module(*[torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names])
        return out.float().numpy()

    return run


def file_bytes(paths: Sequence[Path]) -> int:
    """Total size of existing files."""
    return sum(p.stat().st_size for p in paths if p.exists())
