"""The FID cost of a deployment choice: an artifact against its PyTorch reference on the same images.

The artifact and its PyTorch reference sample the same images (same seeds, same labels, same sampler), both
are scored against one reference, and the difference is reported.

``fid_delta(FidDeltaRequest(...)) -> dict`` is what ``ditdeploy check --fid-ref REF`` runs. The reference
model always does full work (no guidance interval, no feature reuse), so the artifact's ``cfg_interval`` /
``cache_interval`` are costed too. Both runs go through :func:`ditdeploy.run.generation.generate`; their npz
files live in a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FidDeltaRequest", "fid_delta"]


@dataclass
class FidDeltaRequest:
    """Artifact + torch reference checkpoint, the FID reference (npz or ``"digits"``) and the sampling settings."""

    artifact: Path
    reference: Path  # the torch checkpoint the artifact was exported from
    fid_ref: str | Path
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    samples: int = 1000  # images per run (rounded down to whole classes, at least one per class)
    sampler: str = "ddim"
    steps: int = 50
    cfg_scale: float | None = None
    seed: int = 0
    cfg_interval: list[int] | None = None
    cache_interval: int | None = None
    vae: Path | None = None
    inception: Path | None = None
    batch_size: int | None = None
    progress: bool = True


def _sample(req: FidDeltaRequest, engine: Path, backend: str | None, options: dict, npz: Path, per_class: int,
            artifact_side: bool) -> dict[str, Any]:
    from ditdeploy.run.generation import SampleRequest, generate

    sreq = SampleRequest(engine=engine, backend=backend, options=options, vae=req.vae, num_per_label=per_class,
                         sampler=req.sampler, steps=req.steps, cfg_scale=req.cfg_scale, seed=req.seed,
                         batch_size=req.batch_size, out=None, npz=npz,
                         cfg_interval=req.cfg_interval if artifact_side else None,
                         cache_interval=req.cache_interval if artifact_side else None)
    res = generate(sreq)
    return {"backend": res.backend, "images": res.count, "cfg_scale": res.cfg_scale, "work": dict(res.work)}


def _num_classes(path: Path) -> int:
    from ditdeploy.run.deployment import open_deployment

    return int(open_deployment(path, "torch").denoiser.config.num_classes)


def fid_delta(req: FidDeltaRequest) -> dict[str, Any]:
    """Sample both, score both against ``fid_ref`` and each other; returns the report section."""
    from ditdeploy.errors import DitDeployError
    from ditdeploy.fid.evaluate import DIGITS_REF, FidRequest, evaluate

    if req.samples < 2:
        raise DitDeployError(f"--fid-samples must be >= 2, got {req.samples}")
    per_class = max(1, req.samples // _num_classes(req.reference))
    from ditdeploy.artifact.files import temp_dir

    with temp_dir(kind="fid") as tmp:
        a_npz, r_npz = Path(tmp) / "artifact.npz", Path(tmp) / "reference.npz"
        a_run = _sample(req, req.artifact, req.backend, dict(req.options), a_npz, per_class, True)
        r_run = _sample(req, req.reference, "torch", {}, r_npz, per_class, False)
        base = FidRequest(samples=a_npz, ref=req.fid_ref, inception=req.inception, progress=req.progress)
        a_rep = evaluate(base)
        r_rep = evaluate(dataclasses.replace(base, samples=r_npz))
        kind = "digits" if str(req.fid_ref) == DIGITS_REF else "inception"
        between = evaluate(dataclasses.replace(base, ref=r_npz, precision_recall=False, extractor=kind))
    return {"fid_ref": str(req.fid_ref), "images": a_run["images"], "sampler": req.sampler, "steps": req.steps,
            "cfg_scale": a_run["cfg_scale"], "seed": req.seed, "cfg_interval": req.cfg_interval,
            "cache_interval": req.cache_interval, "extractor": a_rep["extractor"],
            "artifact": {**a_run, "metrics": a_rep["metrics"]}, "reference": {**r_run, "metrics": r_rep["metrics"],
                                                                               "checkpoint": str(req.reference)},
            "fid_delta": a_rep["metrics"]["fid"] - r_rep["metrics"]["fid"],
            "fid_artifact_vs_reference_samples": between["metrics"]["fid"]}


def format_delta(d: dict[str, Any]) -> str:
    """One summary line for the console."""
    a, r = d["artifact"]["metrics"], d["reference"]["metrics"]
    return (f"FID vs {d['fid_ref']} ({d['images']} images, {d['sampler']} {d['steps']}, cfg {d['cfg_scale']:g}, "
            f"seed {d['seed']}): artifact {a['fid']:.4f}, torch reference {r['fid']:.4f}, delta {d['fid_delta']:+.4f}; "
            f"artifact vs reference samples {d['fid_artifact_vs_reference_samples']:.4f}")
