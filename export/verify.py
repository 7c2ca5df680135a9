"""Parity at export: run the freshly written ONNX file on ONNX Runtime CPU and compare it with the torch model.

The inputs are ``ditdeploy.proof.parity.probe_inputs`` (seeded; both CFG halves; timesteps over 0..999), one
``session.run`` per batch size on the same file, so the dynamic batch dimension is exercised too. The gates are the
per-call rows of ``ditdeploy.proof.parity.THRESHOLDS``; the runs, numbers and verdict come from
``ditdeploy.proof.parity.compare_runs``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.proof.parity import compare_runs, thresholds_for


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
    precision: str = "fp32",
    tolerance: dict[str, float] | None = None,
    output: str | None = None,
    what: str = "ONNX",
    after_reference: Callable[[], None] | None = None,
    run: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Run every feed through ORT and ``reference`` (``parity.compare_runs``); return per-batch metrics; raise
    NumericsError beyond the per-call limits of ``precision``'s THRESHOLDS row (``tolerance``, ``{"rel_l2",
    "cosine"}``, replaces them).

    All reference outputs are computed first; ``after_reference`` (e.g. freeing the torch model) runs before the
    ORT session is created, so the two never need to be in memory together. ``run`` replaces the ORT session (other
    artifact formats, e.g. the AOTInductor ``.pt2``, use the same inputs and checks).

    The returned dict (the manifest's ``parity``) holds ``backend``, ``reference``, ``tolerance``, ``batches`` (one
    entry per feed with batch size, timesteps, labels, rel_l2, cosine, max_abs, finite) and the worst values.
    """
    refs = [np.asarray(reference(feed), dtype=np.float32) for feed in feeds]
    if after_reference is not None:
        after_reference()
    if run is None:
        sess = ort_session(onnx_path)
        names = [i.name for i in sess.get_inputs()]

        def run(feed: dict[str, np.ndarray]) -> np.ndarray:
            return sess.run([output] if output else None, {k: feed[k] for k in names})[0]

    tol = tolerance or {}
    th = thresholds_for(precision).replace(call_rel_l2=tol.get("rel_l2"), call_cosine=tol.get("cosine"))
    trivial = not any(np.any(r) for r in refs)
    if trivial:  # an untrained adaLN-Zero DiT outputs exactly 0: the comparison then proves nothing about the blocks
        warnings.warn(f"{what}: the reference output is all zeros, so the parity check is trivial", stacklevel=2)
    res = compare_runs(refs, run, feeds, thresholds=th, what=what, against="torch")
    batches = []
    for feed, p in zip(feeds, res.probes, strict=True):
        entry = {"batch": p.batch, **p.report.metrics(), "reference_rms": p.reference_rms}
        batches.append({**entry, **{k: feed[k].tolist() for k in ("t", "y") if k in feed}})
    result = {"backend": "onnxruntime-cpu", "reference": "torch-fp32", "tolerance": res.tolerance(),
              "batches": batches, "worst": res.worst(), "passed": True}
    if trivial:
        result["note"] = "reference output is all zeros (untrained zero-initialised model?): parity is trivial"
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
