"""Parity of an exported artifact against the PyTorch reference: per denoiser call and end to end.

Two measurements, both on the same inputs for artifact and reference:

* **Per call** ("probes"): at ``n_timesteps`` timesteps spread evenly over 0..999 (both ends included), a batch of
  ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` built from the *reference's own samples* ``x0`` (so the inputs lie
  where the sampler actually goes, not on arbitrary noise), evaluated for both CFG halves: the conditional labels and
  the null class. Metrics per (timestep, half): max-abs, rel-L2, cosine (``ditdeploy.proof.distances``), plus Polygraphy's
  elementwise error statistics (median/mean abs and rel diff) when Polygraphy is installed.
* **End to end**: the same initial noise, labels, sampler, steps, guidance and seed through ``ditdeploy.diffusion``;
  final-latent rel-L2/cosine/max-abs, and image PSNR/SSIM on the decoded images (both latents decoded by the same
  decoder, so the image numbers measure the denoiser's error; pixel-space models compare their pixels directly).

The reference side (probe inputs and outputs, noise, labels, final latents, images) is a :class:`Golden`, computed
from a torch checkpoint or loaded from a ``.npz`` golden file, so an artifact can be checked where torch is absent.
This module imports only numpy (Polygraphy lazily and optionally); the sampler and runtimes are imported lazily.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.config.variants import DiTConfig
from ditdeploy.errors import ArtifactError, DitDeployError
from ditdeploy.proof import distances
from ditdeploy.proof.parity import (  # noqa: F401  (THRESHOLDS, thresholds_for, ...: the table lives in ditdeploy.proof.parity)
    THRESHOLDS,
    Thresholds,
    compare,
    effective_precision,
    probe_timesteps,
    thresholds_for,
)
from ditdeploy.proof.parity import trajectory_probes as make_probes
from ditdeploy.run.watched import NonFiniteError, Watched, ensure_finite, nonfinite_desc

GOLDEN_VERSION = 1


# --------------------------------------------------------------------------------------------------------------------
# The reference side
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Golden:
    """Inputs and reference outputs of one check: everything needed to judge an artifact without torch."""

    meta: dict[str, Any]
    probe_x: np.ndarray  # (K, M, C, H, W) float32; M = 2B rows: [cond; uncond]
    probe_t: np.ndarray  # (K, M) int64
    probe_y: np.ndarray  # (K, M) int64
    probe_out: np.ndarray  # (K, M, outC, H, W) float32 reference outputs
    noise: np.ndarray  # (B, C, H, W) float32 initial x_T
    labels: np.ndarray  # (B,) int64
    ref_latents: np.ndarray  # (B, C, H, W) float32 reference x_0
    ref_images: np.ndarray | None = None  # (B, 3|C, H', W') float32 in [-1, 1] when decoded / pixel space

    @property
    def config(self) -> DiTConfig:
        return DiTConfig.from_dict(self.meta["config"])


def has_torch() -> bool:
    """Whether torch can be imported here, without importing it (False when it is absent or blocked)."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["torch"] is None (import blocked)
        return False


def spread_labels(batch: int, num_classes: int) -> np.ndarray:
    """``batch`` class labels spread over all classes (0, k, 2k, ...)."""
    return (np.arange(batch, dtype=np.int64) * num_classes // max(batch, 1)) % num_classes


def run_probes(denoiser: Callable, probe_x, probe_t, probe_y, backend: str) -> np.ndarray:
    """Run every probe call; NaN/Inf raise :class:`NonFiniteError` naming the backend and timestep."""
    outs = []
    for k in range(probe_x.shape[0]):
        out = np.asarray(denoiser(probe_x[k], probe_t[k], probe_y[k]), dtype=np.float32)
        t = int(probe_t[k, 0])
        ensure_finite(out, lambda a, t=t: f"{backend} produced {nonfinite_desc(a)} in the per-call check at t={t}")
        outs.append(out)
    return np.stack(outs)


def sample_e2e(denoiser: Callable, config: DiTConfig, noise, labels, *, method: str, steps: int, cfg_scale: float,
               seed: int, backend: str, progress: bool = False, cfg_interval: Any = None,
               cache_interval: int | None = None) -> tuple[np.ndarray, Watched]:
    """The sampling loop of ``ditdeploy.diffusion`` with NaN/Inf watching; returns (x_0, watcher).

    ``cfg_interval`` / ``cache_interval``: the reduced-work options of ``sample`` (default off)."""
    from ditdeploy.diffusion import sample

    w = Watched(denoiser, backend, finite=True, unit="sampling step")
    x0 = sample(w, noise, labels, method=method, steps=steps, cfg_scale=cfg_scale, seed=seed,
                num_classes=config.num_classes, progress=progress, cfg_interval=cfg_interval,
                cache_interval=cache_interval)
    x0 = np.asarray(x0, dtype=np.float32)
    ensure_finite(x0, lambda a: f"{backend}: the sampler's final latents contain {nonfinite_desc(a)}")
    return x0, w


def to_images(config: DiTConfig, latents: np.ndarray, decoder: Callable | None) -> np.ndarray | None:
    """Images in [-1, 1] for comparison: decoded latents, the pixels of a pixel-space model, or None."""
    if config.space == "pixel":
        return np.clip(latents, -1.0, 1.0).astype(np.float32)
    if decoder is None:
        return None
    return np.clip(np.asarray(decoder(latents), dtype=np.float32), -1.0, 1.0)


def make_golden(reference: Callable, config: DiTConfig, *, method: str = "ddim", steps: int = 25,
                cfg_scale: float = 4.0, seed: int = 0, batch: int = 4, n_timesteps: int = 8,
                decoder: Callable | None = None, reference_name: str = "torch",
                extra_meta: dict[str, Any] | None = None) -> Golden:
    """Run the reference end to end, then build and run the per-call probes around its samples."""
    rng = np.random.default_rng(seed)
    c, s = config.in_channels, config.input_size
    noise = rng.standard_normal((batch, c, s, s)).astype(np.float32)
    labels = spread_labels(batch, config.num_classes)
    ref_latents, _ = sample_e2e(reference, config, noise, labels, method=method, steps=steps, cfg_scale=cfg_scale,
                                seed=seed, backend=reference_name)
    ts = probe_timesteps(n_timesteps)
    px, pt, py = make_probes(config, ref_latents, labels, ts, seed)
    pout = run_probes(reference, px, pt, py, reference_name)
    images = to_images(config, ref_latents, decoder)
    from ditdeploy.artifact.files import tool_versions

    meta = {
        "golden_version": GOLDEN_VERSION,
        "config": dataclasses.asdict(config),
        "sampler": method,
        "steps": int(steps),
        "cfg_scale": float(cfg_scale),
        "seed": int(seed),
        "reference": reference_name,
        "decoded": images is not None and config.space == "latent",
        "tools": tool_versions(),
        **(extra_meta or {}),
    }
    return Golden(meta, px, pt, py, pout, noise, labels, ref_latents, images)


def save_golden(path: str | Path, g: Golden) -> None:
    """Write a golden file (.npz, no pickles) atomically."""
    from ditdeploy.artifact.files import atomic_path

    arrays = {
        "meta": np.frombuffer(json.dumps(g.meta, sort_keys=True).encode(), dtype=np.uint8),
        "probe_x": g.probe_x, "probe_t": g.probe_t, "probe_y": g.probe_y, "probe_out": g.probe_out,
        "noise": g.noise, "labels": g.labels, "ref_latents": g.ref_latents,
    }
    if g.ref_images is not None:
        arrays["ref_images"] = g.ref_images
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def load_golden(path: str | Path) -> Golden:
    """Read a golden file written by :func:`save_golden` (refuses pickled objects)."""
    p = Path(path)
    if not p.is_file():
        raise DitDeployError(f"golden file {p} not found: write one with `ditdeploy check --save-golden {p.name}`")
    from ditdeploy.system.bounds import check_npz

    check_npz(p, what="golden file")  # declared sizes before anything is inflated
    try:
        with np.load(p, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except Exception as e:  # OSError, ValueError (pickled arrays refused), zipfile.BadZipFile, EOFError, ...
        raise ArtifactError(f"{p} is not a readable golden .npz ({type(e).__name__}: {e}); write it again with "
                            "--save-golden") from e
    missing = {"meta", "probe_x", "probe_t", "probe_y", "probe_out", "noise", "labels", "ref_latents"} - set(d)
    if missing:
        raise ArtifactError(f"golden file {p} lacks {sorted(missing)}: write it again with --save-golden")
    try:
        meta = json.loads(d["meta"].tobytes().decode())
    except ValueError as e:
        raise ArtifactError(f"golden file {p} has unreadable metadata ({e})") from e
    if meta.get("golden_version") != GOLDEN_VERSION:
        raise ArtifactError(f"golden file {p} has version {meta.get('golden_version')}, expected {GOLDEN_VERSION}")
    bad = [n for n in ("probe_x", "probe_out", "noise", "ref_latents", "ref_images")
           if n in d and d[n].dtype.kind == "f" and not np.isfinite(d[n]).all()]
    if bad:
        raise ArtifactError(f"golden file {p} has NaN/Inf in {', '.join(bad)}: the reference run was broken; "
                            "write it again with --save-golden")
    k, m = d["probe_t"].shape
    if d["probe_x"].shape[:2] != (k, m) or d["probe_out"].shape[:2] != (k, m) or d["probe_y"].shape != (k, m):
        raise ArtifactError(f"golden file {p} has inconsistent probe shapes")
    return Golden(meta, d["probe_x"], d["probe_t"], d["probe_y"], d["probe_out"], d["noise"], d["labels"],
                  d["ref_latents"], d.get("ref_images"))


# --------------------------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------------------------
def elementwise_stats(actual: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Elementwise error statistics: Polygraphy's comparator (median/mean abs and rel diff) when installed, else
    the same statistics in numpy. Polygraphy's reldiff is |a - r| / |r| per element."""
    try:
        from polygraphy.comparator import IterationResult, SimpleCompareFunc
        from polygraphy.logger import G_LOGGER
    except ImportError:
        return _numpy_stats(actual, reference)
    func = SimpleCompareFunc(check_error_stat="median", atol=np.inf, rtol=np.inf)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        # Polygraphy divides by the SECOND result's magnitude: the reference goes second
        res = func(IterationResult({"out": np.ascontiguousarray(actual)}, runner_name="artifact"),
                   IterationResult({"out": np.ascontiguousarray(reference)}, runner_name="reference"))["out"]
    return {k: float(getattr(res, k)) for k in ("median_absdiff", "mean_absdiff", "median_reldiff", "mean_reldiff")}


def _numpy_stats(actual: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    a, r = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    ad = np.abs(a - r)
    with np.errstate(divide="ignore", invalid="ignore"):
        rd = ad / np.abs(r)
    rd = np.where(ad == 0, 0.0, rd)  # as Polygraphy: 0/0 -> 0 (it adds 2e-16 to zero references)
    return {"median_absdiff": float(np.median(ad)), "mean_absdiff": float(np.mean(ad)),
            "median_reldiff": float(np.median(rd)), "mean_reldiff": float(np.mean(rd))}


def compare_calls(actual: np.ndarray, g: Golden) -> list[dict[str, Any]]:
    """One row per (timestep, CFG half): t, half, max_abs, rel_l2, cosine and elementwise stats."""
    rows = []
    null = g.config.null_class
    for k in range(g.probe_t.shape[0]):
        for half in ("cond", "uncond"):
            sel = (g.probe_y[k] == null) if half == "uncond" else (g.probe_y[k] != null)
            if not sel.any():
                continue
            a, r = actual[k][sel], g.probe_out[k][sel]
            c = compare(a, r)
            row = {"t": int(g.probe_t[k, 0]), "half": half, "rows": int(sel.sum()),
                   "max_abs": c.max_abs, "rel_l2": c.rel_l2, "cosine": c.cosine}
            row.update(elementwise_stats(a, r))
            rows.append(row)
    return rows


@dataclass
class CheckReport:
    """Everything ``ditdeploy check`` measured, the thresholds used and the verdict."""

    artifact: str
    backend: str
    precision: str
    thresholds: Thresholds
    reference: str
    calls: list[dict[str, Any]] = field(default_factory=list)
    e2e: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        from ditdeploy.system.cpu_isa import detect

        worst = summarize_calls(self.calls)
        return {
            "artifact": self.artifact, "backend": self.backend, "precision": self.precision,
            "cpu_isa": detect().record(),  # the kernels (and INT8 saturation) depend on it: a result names its CPU
            "reference": self.reference, "passed": self.passed, "failures": self.failures,
            "thresholds": dataclasses.asdict(self.thresholds), "settings": self.settings,
            "calls": self.calls, "calls_worst": worst, "end_to_end": self.e2e,
        }


def summarize_calls(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Worst values over all calls (max of max-abs and rel-L2, min of cosine)."""
    if not rows:
        return {}
    return {"max_abs": max(r["max_abs"] for r in rows), "rel_l2": max(r["rel_l2"] for r in rows),
            "cosine": min(r["cosine"] for r in rows)}


def evaluate(report: CheckReport) -> list[str]:
    """Failure messages, each naming the metric, its value, the limit and where."""
    th, fails = report.thresholds, []
    for r in report.calls:
        where = f"t={r['t']} {r['half']}"
        if th.call_rel_l2 is not None and not r["rel_l2"] <= th.call_rel_l2:
            fails.append(f"per-call rel-L2 {r['rel_l2']:.3g} > {th.call_rel_l2:g} at {where}")
        if th.call_cosine is not None and not r["cosine"] >= th.call_cosine:
            fails.append(f"per-call cosine {r['cosine']:.6f} < {th.call_cosine:g} at {where}")
    e = report.e2e
    if e.get("latent_rel_l2") is not None and th.latent_rel_l2 is not None and not e["latent_rel_l2"] <= th.latent_rel_l2:
        fails.append(f"end-to-end latent rel-L2 {e['latent_rel_l2']:.3g} > {th.latent_rel_l2:g}")
    if e.get("psnr") is not None and th.psnr is not None and not e["psnr"] >= th.psnr:
        fails.append(f"end-to-end image PSNR {e['psnr']:.2f} dB < {th.psnr:g} dB")
    if e.get("ssim") is not None and th.ssim is not None and not e["ssim"] >= th.ssim:
        fails.append(f"end-to-end image SSIM {e['ssim']:.4f} < {th.ssim:g}")
    return fails


def check(denoiser: Callable, g: Golden, *, thresholds: Thresholds, precision: str, backend: str,
          artifact: str = "", decoder: Callable | None = None, run_e2e: bool = True,
          progress: bool = False, cfg_interval: Any = None, cache_interval: int | None = None) -> CheckReport:
    """Judge ``denoiser`` against the golden reference: per-call probes, then the end-to-end loop.

    ``cfg_interval`` / ``cache_interval`` run the artifact's end-to-end loop with less work (the reference stays
    full work), so the end-to-end numbers measure the quality price of those options against the same seeds."""
    cfg = g.config
    m = g.meta
    rep = CheckReport(artifact=artifact, backend=backend, precision=precision, thresholds=thresholds,
                      reference=str(m.get("reference", "")),
                      settings={k: m.get(k) for k in ("sampler", "steps", "cfg_scale", "seed")}
                      | {"batch": int(g.noise.shape[0]), "timesteps": [int(t) for t in g.probe_t[:, 0]]}
                      | ({"cfg_interval": list(cfg_interval) if cfg_interval else None,
                          "cache_interval": cache_interval} if cfg_interval or cache_interval else {}))
    if g.probe_x.shape[0]:
        try:
            out = run_probes(denoiser, g.probe_x, g.probe_t, g.probe_y, backend)
        except NonFiniteError as e:
            rep.failures.append(str(e))
            return rep
        if out.shape != g.probe_out.shape:
            raise ArtifactError(f"{backend} returned outputs of shape {out.shape[1:]}, the reference "
                                f"{g.probe_out.shape[1:]}: the artifact is not the reference's model")
        rep.calls = compare_calls(out, g)
    if run_e2e:
        try:
            lat, w = sample_e2e(denoiser, cfg, g.noise, g.labels, method=m["sampler"], steps=int(m["steps"]),
                                cfg_scale=float(m["cfg_scale"]), seed=int(m["seed"]), backend=backend,
                                progress=progress, cfg_interval=cfg_interval, cache_interval=cache_interval)
        except NonFiniteError as e:
            rep.failures.extend(evaluate(rep))
            rep.failures.append(str(e))
            return rep
        lc = compare(lat, g.ref_latents)
        e2e: dict[str, Any] = {
            "latent_rel_l2": lc.rel_l2, "latent_cosine": lc.cosine, "latent_max_abs": lc.max_abs,
            "denoiser_calls": w.calls,
            "psnr": None, "ssim": None, "images": "none",
        }
        ref_img = to_images(cfg, g.ref_latents, decoder) if (decoder is not None or cfg.space == "pixel") else None
        if ref_img is None and g.ref_images is not None and decoder is None and cfg.space == "latent":
            e2e["images"] = "skipped: no decoder for the artifact's latents (reference images in the golden file)"
        act_img = to_images(cfg, lat, decoder)
        if ref_img is not None and act_img is not None:
            a255, r255 = (act_img + 1.0) * 127.5, (ref_img + 1.0) * 127.5
            e2e.update(psnr=distances.psnr(a255, r255, 255.0), ssim=distances.ssim(a255, r255, 255.0),
                       images="pixels" if cfg.space == "pixel" else "decoded (same decoder for both latents)")
        rep.e2e = e2e
    rep.failures = evaluate(rep)
    return rep


# --------------------------------------------------------------------------------------------------------------------
# Terminal table
# --------------------------------------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def _cpu_label() -> str:
    from ditdeploy.system.cpu_isa import detect

    return detect().label()


def format_report(rep: CheckReport) -> str:
    """The per-call table, the end-to-end lines and the verdict."""
    th = rep.thresholds
    lines = [f"check {rep.artifact or '(reference only)'}  backend={rep.backend}  precision={rep.precision}  "
             f"reference={rep.reference}",
             f"thresholds ({rep.precision}: {th.reason}): per-call rel-L2 <= {_fmt(th.call_rel_l2, 'g')}, "
             f"cosine >= {_fmt(th.call_cosine, 'g')}; latent rel-L2 <= {_fmt(th.latent_rel_l2, 'g')}, "
             f"PSNR >= {_fmt(th.psnr, 'g')} dB, SSIM >= {_fmt(th.ssim, 'g')}",
             f"cpu: {_cpu_label()}",
             ""]
    hdr = f"{'t':>5} {'half':>6} {'max-abs':>10} {'rel-L2':>10} {'cosine':>10} {'med |rel|':>10}  status"
    lines += [hdr, "-" * len(hdr)]
    for r in rep.calls:
        ok = ((th.call_rel_l2 is None or r["rel_l2"] <= th.call_rel_l2)
              and (th.call_cosine is None or r["cosine"] >= th.call_cosine))
        lines.append(f"{r['t']:>5} {r['half']:>6} {r['max_abs']:>10.3e} {r['rel_l2']:>10.3e} "
                     f"{r['cosine']:>10.7f} {r['median_reldiff']:>10.3e}  {'ok' if ok else 'FAIL'}")
    e = rep.e2e
    if e:
        lines += ["", f"end to end ({rep.settings.get('sampler')}, {rep.settings.get('steps')} steps, "
                      f"cfg {rep.settings.get('cfg_scale')}, batch {rep.settings.get('batch')}, "
                      f"{e.get('denoiser_calls')} denoiser calls):",
                  f"  latent rel-L2 {_fmt(e['latent_rel_l2'], '.3e')}  cosine {_fmt(e['latent_cosine'], '.7f')}  "
                  f"max-abs {_fmt(e['latent_max_abs'], '.3e')}",
                  f"  image PSNR {_fmt(e['psnr'], '.2f')} dB  SSIM {_fmt(e['ssim'], '.4f')}  ({e['images']})"]
    lines.append("")
    if rep.passed:
        lines.append("PASS")
    else:
        lines.append(f"FAIL ({len(rep.failures)} failed gate(s)):")
        lines += [f"  - {f}" for f in rep.failures[:20]]
        if len(rep.failures) > 20:
            lines.append(f"  ... and {len(rep.failures) - 20} more")
    return "\n".join(lines)
