"""Calibration-set capture: the denoiser inputs (x_t, t, y) seen while the real sampler runs.

INT8 ranges must come from the activations the deployed model will see, so the set is recorded from the floating-point
model running ``ditdeploy.diffusion.sample`` with the deployment's sampler, step count and guidance scale
(docs/reference.md §3, PTQ4DiT / Q-DiT):

- both classifier-free-guidance halves: with ``cfg_scale != 1`` the sampler calls ``denoiser([x; x], t, [y; null])``
  and both halves are kept;
- the whole trajectory: of the ``steps`` denoiser calls of each trajectory, ``timesteps`` calls evenly spread from the
  first (t near 999) to the last (t near 0) are kept (all of them when ``steps <= timesteps``);
- labels spread evenly over all classes (each class equally often, order shuffled by the seed);
- a held-out validation set, for error curves and quantizer checks: extra trajectories drawn the same way from
  another seed, or, when the work budget has no room for them, the calibration trajectories' own denoiser calls that
  the ``timesteps`` selection did not keep (their inputs and outputs are computed anyway: no extra denoiser call).

How many trajectories (``samples`` unset): as many as fit a fixed work budget of denoiser multiply-accumulates
(:data:`BUDGET_MACS`, counted by ``ditdeploy.config.macs`` for the model, steps and guidance), 1..32: not wall-clock,
so the same command gives the same set on every machine (issue 24 item 4: the digits model and S/2 256 keep 32,
XL/2 256 at 50 guided steps gets 1, about 2 minutes of its 5-minute calibrate + INT8 export chain here).

Stored as an ``.npz`` (arrays ``x, t, y, step, sample`` and ``val_x, val_t, val_y, val_step, val_sample``) with a JSON
manifest beside it (seed, sampler, counts, per-timestep counts, source artifact and sha256), written atomically.
Numpy only: this module never imports torch (the source denoiser may be a torch reference or any runtime).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.artifact.files import atomic_dir, manifest_path, sha256_file, write_json_atomic
from ditdeploy.artifact.manifest import Manifest, make_manifest
from ditdeploy.errors import ArtifactError, DitDeployError

__all__ = [
    "CalibrationSet",
    "CapturePlan",
    "CaptureSettings",
    "capture_calibration_set",
    "capture_inputs",
    "load_calibration",
    "select_steps",
    "spread_labels",
]

KIND = "calibration"
ARRAYS = ("x", "t", "y", "step", "sample")
VAL_PREFIX = "val_"
MIN_TIMESTEPS = 25  # docs/reference.md §3: at least 25 timesteps spread over the trajectory
VAL_SEED_OFFSET = 1_000_003  # default validation seed = seed + this (a different noise stream)
# validation budget: by default a quarter of the calibration trajectories (at least 1, at most 8), sampled in the
# same batches; its outputs are kept (``val_out``) so the INT8 check needs no second fp32 pass. Where those extra
# trajectories do not fit the work budget, the calibration trajectories' unkept calls are the validation set.
VAL_SHARE, VAL_MAX = 4, 8
# the default work budget: denoiser multiply-accumulates of every trajectory sampled (calibration + validation).
# 20e12 = 20 T: 32 trajectories for S/2 256 (0.61 T each at DDIM 50, cfg 4) and everything smaller (the digits model:
# 1.3 G each), 1 for XL/2 256 (11.9 T: 100 rows, ~130 s on the 2-core Xeon of bench/results/xl2_int8_chain.json)
BUDGET_MACS = 20e12
MAX_SAMPLES = 32
VAL_TRAJECTORIES, VAL_UNKEPT = "trajectories", "unkept calls"


@dataclass(frozen=True)
class CaptureSettings:
    """How a calibration set is drawn. Defaults match ``ditdeploy sample`` (DDIM, 50 steps, cfg 4)."""

    samples: int | None = None  # None: as many as fit budget_macs (1..MAX_SAMPLES)
    steps: int = 50
    sampler: str = "ddim"
    cfg_scale: float = 4.0
    eta: float = 0.0
    seed: int = 0
    timesteps: int = MIN_TIMESTEPS
    batch_size: int = 16
    val_samples: int | None = None  # None: VAL_SHARE of samples (1..VAL_MAX) if they fit, else the unkept calls
    val_seed: int | None = None
    guide_all_channels: bool = False
    budget_macs: float = BUDGET_MACS

    def calls(self) -> tuple[int, int, int]:
        """Per trajectory: (denoiser calls, of them kept for calibration, rows per call)."""
        return self.steps, min(self.timesteps, self.steps), 2 if self.cfg_scale != 1 else 1

    def plan(self, config: Any) -> CapturePlan:
        """Resolve the trajectory counts and the validation source for a model ``config`` (module doc)."""
        from ditdeploy.config.macs import full_macs

        calls, kept, rows = self.calls()
        per = calls * rows * full_macs(config)  # multiply-accumulates of one trajectory
        fit = int(self.budget_macs // per) if per else MAX_SAMPLES
        n = int(self.samples) if self.samples is not None else min(MAX_SAMPLES, max(1, fit))

        def share(k: int) -> int:
            return min(VAL_MAX, max(1, -(-k // VAL_SHARE)))

        if self.val_samples is not None:
            nv, source = int(self.val_samples), VAL_TRAJECTORIES
        else:
            if self.samples is None and calls == kept:  # validation needs extra trajectories: leave them room
                while n > 1 and n + share(n) > fit:
                    n -= 1
            nv, source = share(n), VAL_TRAJECTORIES
            if n + nv > fit:
                if calls > kept:  # zero-cost validation: the calls the timestep selection left out
                    nv, source = 0, VAL_UNKEPT
                else:
                    nv = max(1, min(nv, fit - n))
        if source == VAL_TRAJECTORIES and nv == 0:
            source = None
        return CapturePlan(samples=n, val_samples=nv, val_source=source, trajectory_macs=per,
                           budget_macs=self.budget_macs, samples_from="budget" if self.samples is None else "--samples")

    def resolved_val_samples(self, config: Any) -> int:
        """Extra validation trajectories for ``config`` (0 where the validation is the unkept calls, or none)."""
        return self.plan(config).val_samples

    def resolved_val_seed(self) -> int:
        return self.seed + VAL_SEED_OFFSET if self.val_seed is None else int(self.val_seed)

    def validate(self) -> None:
        """One-line DitDeployError for values that cannot work."""
        from ditdeploy.diffusion import check_settings

        check_settings(self.sampler, self.steps, self.cfg_scale, self.eta, flags=True)
        if self.samples is not None and self.samples < 1:
            raise DitDeployError(f"--samples must be >= 1, got {self.samples}")
        if self.val_samples is not None and self.val_samples < 0:
            raise DitDeployError(f"--val-samples must be >= 0, got {self.val_samples}")
        if self.timesteps < 1:
            raise DitDeployError(f"--timesteps must be >= 1, got {self.timesteps}")
        if self.batch_size < 1:
            raise DitDeployError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.seed < 0 or self.resolved_val_seed() < 0:
            raise DitDeployError("seeds must be >= 0")
        if self.val_samples and self.resolved_val_seed() == self.seed:
            self.check_seeds(VAL_TRAJECTORIES)

    def check_seeds(self, val_source: str | None) -> None:
        """Validation trajectories need their own noise: a one-line error when they would reuse ``--seed`` (the
        unkept-calls validation draws no noise, so any --val-seed is fine there)."""
        if val_source == VAL_TRAJECTORIES and self.resolved_val_seed() == self.seed:
            raise DitDeployError("the validation seed must differ from --seed (a held-out set needs other noise)")


@dataclass(frozen=True)
class CapturePlan:
    """What :meth:`CaptureSettings.plan` resolved: trajectories, validation trajectories and source, the budget."""

    samples: int
    val_samples: int  # extra validation trajectories (0 with the unkept-calls validation)
    val_source: str | None  # VAL_TRAJECTORIES, VAL_UNKEPT, or None (no validation set)
    trajectory_macs: int
    budget_macs: float
    samples_from: str  # "budget" or "--samples"

    def record(self) -> dict[str, Any]:
        """The manifest's ``budget`` block."""
        return {"macs": self.budget_macs, "macs_per_trajectory": self.trajectory_macs,
                "samples": self.samples, "samples_from": self.samples_from,
                "spent_macs": (self.samples + self.val_samples) * self.trajectory_macs,
                "validation": self.val_source}

    def captured_rows(self, settings: CaptureSettings) -> int:
        """Denoiser input rows the capture keeps in memory (calibration + validation)."""
        calls, kept, rows = settings.calls()
        unkept = self.samples * (calls - kept) if self.val_source == VAL_UNKEPT else 0
        return ((self.samples + self.val_samples) * kept + unkept) * rows


def spread_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    """``n`` labels covering the classes evenly (counts differ by at most one), in a seeded random order.

    With ``n < num_classes`` the labels are evenly spaced over 0..num_classes-1 (so both ends of the class range
    are represented); with ``n >= num_classes`` every class appears ``n // num_classes`` or one more times.
    """
    if n < 0 or num_classes < 1:
        raise DitDeployError(f"cannot spread {n} labels over {num_classes} classes")
    labels = (np.arange(n, dtype=np.int64) * num_classes) // max(n, 1)
    return np.random.default_rng(seed).permutation(labels).astype(np.int64)


def select_steps(n_calls: int, keep: int) -> np.ndarray:
    """Indices of ``keep`` calls evenly spread over ``0..n_calls-1`` (first and last included); all if fewer."""
    if n_calls <= 0:
        return np.zeros(0, dtype=np.int64)
    if keep >= n_calls:
        return np.arange(n_calls, dtype=np.int64)
    if keep == 1:
        return np.array([0], dtype=np.int64)
    # spacing (n-1)/(keep-1) >= 1, so rounding keeps the indices distinct
    return np.round(np.linspace(0, n_calls - 1, keep)).astype(np.int64)


class _Recorder:
    """A denoiser wrapper that keeps a copy of every (x, t, y) it is called with, and the output."""

    def __init__(self, denoiser: Callable[..., np.ndarray], on_call: Callable[[], None] | None = None):
        self.denoiser = denoiser
        self.calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.on_call = on_call
        # the sampler reads name / config / num_classes from the denoiser
        self.name = getattr(denoiser, "name", "denoiser")
        self.config = getattr(denoiser, "config", None)

    def __call__(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = self.denoiser(x, t, y)
        self.calls.append((np.array(x, dtype=np.float32, copy=True), np.array(t, dtype=np.int64, copy=True),
                           np.array(y, dtype=np.int64, copy=True), out))
        if self.on_call is not None:
            self.on_call()
        return out


def _noise(samples: int, seed: int, batch_size: int, config: Any) -> np.ndarray:
    """Initial noise of ``samples`` trajectories: batch ``b`` (of ``batch_size``) from ``default_rng([seed, b])``."""
    c, s = config.in_channels, config.input_size
    parts = [np.random.default_rng([seed, b]).standard_normal((min(batch_size, samples - start), c, s, s),
                                                              dtype=np.float32)
             for b, start in enumerate(range(0, samples, batch_size))]
    return np.concatenate(parts) if parts else np.zeros((0, c, s, s), np.float32)


@dataclass(frozen=True)
class _Set:
    """One set of trajectories to capture: its noise, labels, rng seed and whether to keep the model outputs."""

    noise: np.ndarray
    labels: np.ndarray
    seed: int
    keep_out: bool = False


def _capture_sets(denoiser: Callable[..., np.ndarray], config: Any, sets: list[_Set], *, steps: int, sampler: str,
                  cfg_scale: float, eta: float, timesteps: int, batch_size: int, guide_all_channels: bool,
                  progress: Any, unkept: bool = False) -> list[dict[str, np.ndarray]]:
    """Sample every trajectory of ``sets`` together, ``batch_size`` trajectories per sampler run (a set's tail
    shares a run with the next set's head), and return the kept inputs of each set (+ ``out`` where asked).
    With ``unkept`` one more dict follows: the first set's calls that the timestep selection did not keep, with the
    model's outputs on them (the zero-cost validation set).
    The sampler's own randomness (DDPM, DDIM eta > 0) of run ``r`` comes from ``default_rng([seed0, r, 1])``."""
    from ditdeploy.diffusion import sample as diffusion_sample

    owner = np.concatenate([np.full(len(st.labels), i) for i, st in enumerate(sets)]).astype(np.int64)
    index = np.concatenate([np.arange(len(st.labels)) for st in sets]).astype(np.int64)
    noise_all = np.concatenate([st.noise for st in sets])
    labels_all = np.concatenate([st.labels for st in sets]).astype(np.int64)
    kept: list[dict[str, list[np.ndarray]]] = [{k: [] for k in (*ARRAYS, "out")} for _ in (*sets, *([0] * unkept))]
    for r, start in enumerate(range(0, len(labels_all), batch_size)):
        sl = slice(start, start + batch_size)
        n = labels_all[sl].shape[0]
        rec = _Recorder(denoiser, (lambda: progress.update(1)) if progress is not None else None)
        diffusion_sample(rec, noise_all[sl], labels_all[sl], method=sampler, steps=steps, cfg_scale=cfg_scale,
                         eta=eta, rng=np.random.default_rng([sets[0].seed, r, 1]), num_classes=config.num_classes,
                         guide_all_channels=guide_all_channels)
        chosen = set(select_steps(len(rec.calls), timesteps).tolist())
        for i, (x, t, y, out) in enumerate(rec.calls):
            rows = np.arange(x.shape[0]) % n  # with guidance the call holds [cond; uncond] of the same images
            who = owner[sl][rows]
            if i in chosen:
                targets = [(kept[k], who == k, st.keep_out) for k, st in enumerate(sets)]
            elif unkept:
                targets = [(kept[-1], who == 0, True)]
            else:
                continue
            for d, sel, keep_out in targets:
                if not sel.any():
                    continue
                d["x"].append(x[sel])
                d["t"].append(t[sel])
                d["y"].append(y[sel])
                d["step"].append(np.full(int(sel.sum()), i, dtype=np.int32))
                d["sample"].append(index[sl][rows][sel].astype(np.int32))
                if keep_out:
                    d["out"].append(np.asarray(out, dtype=np.float32)[sel])
    return [{k: np.concatenate(v) for k, v in d.items() if v} for d in kept]


def capture_inputs(
    denoiser: Callable[..., np.ndarray],
    config: Any,
    *,
    samples: int,
    seed: int,
    steps: int = 50,
    sampler: str = "ddim",
    cfg_scale: float = 4.0,
    eta: float = 0.0,
    timesteps: int = MIN_TIMESTEPS,
    batch_size: int = 16,
    guide_all_channels: bool = False,
    progress: Any = None,
) -> dict[str, np.ndarray]:
    """Run the sampler on ``samples`` trajectories and return the kept denoiser inputs.

    Returns arrays ``x`` (N, C, H, W) float32, ``t`` (N,) int64 original timesteps, ``y`` (N,) int64 (null class =
    ``config.num_classes`` for the unconditional half), ``step`` (N,) the call's index in its trajectory and
    ``sample`` (N,) the trajectory's index. Noise of batch ``b`` comes from ``default_rng([seed, b])``; the
    sampler's own randomness (DDPM, DDIM eta > 0) from seed ``[seed, b, 1]``. ``progress`` is a tqdm-like object
    with ``update(n)`` (one unit per denoiser call) or None.
    """
    st = _Set(_noise(samples, seed, batch_size, config), spread_labels(samples, config.num_classes, seed), seed)
    return _capture_sets(denoiser, config, [st], steps=steps, sampler=sampler, cfg_scale=cfg_scale, eta=eta,
                         timesteps=timesteps, batch_size=batch_size, guide_all_channels=guide_all_channels,
                         progress=progress)[0]


def _counts(arr: np.ndarray) -> dict[str, int]:
    vals, cnt = np.unique(arr, return_counts=True)
    return {str(int(v)): int(k) for v, k in zip(vals, cnt, strict=True)}


def _summary(a: dict[str, np.ndarray], null_class: int) -> dict[str, Any]:
    uncond = int((a["y"] == null_class).sum())
    return {
        "inputs": int(a["x"].shape[0]),
        "samples": int(np.unique(a["sample"]).size) if a["sample"].size else 0,
        "timesteps": int(np.unique(a["t"]).size),
        "cond": int(a["x"].shape[0]) - uncond,
        "uncond": uncond,
    }


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: np.savez must not append ".npz" to the temp name
        np.savez(f, **arrays)


def capture_calibration_set(
    denoiser: Callable[..., np.ndarray],
    out: str | os.PathLike,
    settings: CaptureSettings | None = None,
    *,
    val_out: str | os.PathLike | None = None,
    source: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Capture a calibration set (and a held-out validation set) from ``denoiser`` into ``out`` (.npz).

    ``denoiser`` needs a ``config`` (DiTConfig) attribute, like every ``ditdeploy.runtimes`` denoiser. The
    validation arrays go into the same file (``val_*``) unless ``val_out`` names a second .npz. ``source`` is
    recorded in the manifest (e.g. ``{"path": ..., "sha256": ..., "backend": ...}``). Returns the manifest.
    """
    settings = settings or CaptureSettings()
    settings.validate()
    cfg = getattr(denoiser, "config", None)
    if cfg is None:
        raise DitDeployError("the calibration source has no model config: load it with ditdeploy.runtimes.load")
    out, val_out = _check_paths(out, val_out)
    plan = settings.plan(cfg)
    settings.check_seeds(plan.val_source)
    val_seed = settings.resolved_val_seed() if plan.val_source == VAL_TRAJECTORIES else settings.seed
    calib, val = _capture_both(denoiser, cfg, settings, plan, val_seed, progress)
    base_fields = _base_fields(cfg, settings, source or {"name": getattr(denoiser, "name", "denoiser")})
    calib_fields = {**base_fields, "role": "calibration", "seed": settings.seed, "budget": plan.record(),
                    **_set_record(calib, cfg)}
    if val is not None:
        calib_fields["validation"] = {
            "seed": val_seed,
            "source": (f"{VAL_UNKEPT}: the denoiser calls of the calibration trajectories that --timesteps did not "
                       "keep (inputs and outputs recorded while sampling, no extra calls)"
                       if plan.val_source == VAL_UNKEPT else
                       f"{VAL_TRAJECTORIES}: {plan.val_samples} extra trajectories from the validation seed"),
            "file": val_out.name if val_out is not None else out.name,
            "prefix": "" if val_out is not None else VAL_PREFIX,
            "counts": _summary(val, cfg.null_class),
            "per_timestep": _counts(val["t"]),
            "outputs": "out: the source model's outputs on these inputs, recorded while sampling" if "out" in val
            else None,
        }
    if settings.steps < MIN_TIMESTEPS:
        calib_fields["warning"] = (
            f"only {settings.steps} sampling steps: fewer than the recommended {MIN_TIMESTEPS} timesteps covered"
        )
    if val is not None and val_out is not None:
        _write_set(val_out, val, {**base_fields, "role": "validation", "seed": val_seed, **_set_record(val, cfg)})
    arrays = dict(calib)
    if val is not None and val_out is None:
        arrays.update({VAL_PREFIX + k: v for k, v in val.items()})
    return _write_set(out, arrays, calib_fields)


def _check_paths(out: str | os.PathLike, val_out: str | os.PathLike | None) -> tuple[Path, Path | None]:
    """``out`` (and the optional separate validation file) must be distinct .npz paths."""
    out = Path(out)
    if out.suffix.lower() != ".npz":
        raise DitDeployError(f"the calibration set is an .npz file: --out {out.name} should end in .npz")
    val = Path(val_out) if val_out is not None else None
    if val is not None and val.suffix.lower() != ".npz":
        raise DitDeployError(f"--val-out {val.name} should end in .npz")
    if val is not None and val.resolve() == out.resolve():
        raise DitDeployError("--val-out must differ from --out (omit it to store the validation set in --out)")
    return out, val


def _capture_both(denoiser: Callable[..., np.ndarray], cfg: Any, settings: CaptureSettings, plan: CapturePlan,
                  val_seed: int, progress: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The calibration inputs and (if asked) the held-out validation inputs with the model's outputs on them,
    sampled in shared batches under one progress bar: extra trajectories, or the unkept calls of the same ones."""
    n, nv, bs = plan.samples, plan.val_samples, settings.batch_size
    sets = [_Set(_noise(n, settings.seed, bs, cfg), spread_labels(n, cfg.num_classes, settings.seed), settings.seed)]
    if nv:
        sets.append(_Set(_noise(nv, val_seed, bs, cfg), spread_labels(nv, cfg.num_classes, val_seed), val_seed,
                         keep_out=True))
    unkept = plan.val_source == VAL_UNKEPT
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=-(-(n + nv) // bs) * settings.steps, desc="calibrate", unit="call", dynamic_ncols=True)
    try:
        got = _capture_sets(denoiser, cfg, sets, steps=settings.steps, sampler=settings.sampler,
                            cfg_scale=settings.cfg_scale, eta=settings.eta, timesteps=settings.timesteps,
                            batch_size=bs, guide_all_channels=settings.guide_all_channels, progress=bar,
                            unkept=unkept)
    finally:
        if bar is not None:
            bar.close()
    return got[0], (got[1] if (nv or unkept) else None)


def _base_fields(cfg: Any, settings: CaptureSettings, source: dict[str, Any]) -> dict[str, Any]:
    """Manifest fields shared by the calibration and validation files."""
    return {
        "kind": KIND,
        "format": "npz",
        "config": dataclasses.asdict(cfg),
        "sampler": {"method": settings.sampler, "steps": settings.steps, "cfg_scale": settings.cfg_scale,
                    "eta": settings.eta, "guide_all_channels": settings.guide_all_channels},
        "timesteps_per_trajectory": int(min(settings.timesteps, settings.steps)),
        "batch_size": settings.batch_size,
        "noise": "x_T of batch b ~ numpy default_rng([seed, b]).standard_normal; sampler rng [seed, b, 1]",
        "source": source,
    }


def _set_record(arrays: dict[str, np.ndarray], cfg: Any) -> dict[str, Any]:
    """Counts, per-timestep and per-label histograms and array shapes of one captured set."""
    return {"counts": _summary(arrays, cfg.null_class), "per_timestep": _counts(arrays["t"]),
            "labels": _counts(arrays["y"]), "arrays": {k: list(v.shape) for k, v in arrays.items()}}


def _write_set(out: Path, arrays: dict[str, np.ndarray], fields: dict[str, Any]) -> dict[str, Any]:
    mp = manifest_path(out)
    with atomic_dir([out, mp]) as tmp:
        tnpz = tmp / out.name
        _write_npz(tnpz, arrays)
        manifest = make_manifest(out, [tnpz], **fields)
        write_json_atomic(tmp / mp.name, manifest)
    return manifest


@dataclass
class CalibrationSet:
    """A loaded calibration set: arrays, optional validation arrays, manifest and the npz's sha256."""

    x: np.ndarray
    t: np.ndarray
    y: np.ndarray
    step: np.ndarray
    sample: np.ndarray
    manifest: Manifest
    sha256: str
    path: Path
    val: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_timesteps(self) -> int:
        return int(np.unique(self.t).size)

    def validation(self) -> dict[str, np.ndarray]:
        """The held-out validation arrays (x, t, y, step, sample); ArtifactError if the set has none."""
        if self.val is None:
            raise ArtifactError(f"{self.path.name} has no validation set: recapture with --val-samples > 0")
        return self.val


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    from ditdeploy.system.bounds import check_npz

    check_npz(path, what="calibration set")  # declared sizes before anything is inflated
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # OSError, ValueError (pickles refused), zipfile.BadZipFile, EOFError, ...
        raise ArtifactError(f"{path} is not a readable calibration .npz ({type(e).__name__}: {e}); recapture it") from e


def check_for_model(cs: CalibrationSet, config: Any) -> None:
    """Check a calibration set against the model it will quantize, before any export work; the one-line error names
    the calibration set as the culprit (recapture it) when its data cannot come from this model."""
    name = cs.path.name
    cc = cs.manifest.config_dict or {}
    for k in ("in_channels", "input_size", "num_classes"):
        if cc.get(k) != getattr(config, k):
            raise ArtifactError(f"calibration set {name} was captured from a model with {k}={cc.get(k)}, not "
                                f"{getattr(config, k)}: capture it from this model")
    sets = {"": {"x": cs.x, "t": cs.t, "y": cs.y}}
    if cs.val is not None:
        sets["validation "] = {k: cs.val.get(k) for k in ("x", "t", "y")}
    want = (config.in_channels, config.input_size, config.input_size)
    for label, a in sets.items():
        x, t, y = a["x"], a["t"], a["y"]
        problems = [
            (x is None or len(x) == 0, "holds no inputs"),
            (x is not None and tuple(x.shape[1:]) != want, f"has inputs x of shape {None if x is None else x.shape[1:]}"
                                                             f", the model takes {want}"),
            (x is not None and x.dtype.kind != "f", f"has non-float inputs x ({None if x is None else x.dtype})"),
            (t is None or t.dtype.kind not in "iu", f"has non-integer timesteps t ({None if t is None else t.dtype})"),
            (y is None or y.dtype.kind not in "iu", f"has non-integer labels y ({None if y is None else y.dtype})"),
            (t is not None and t.size and (t.min() < 0 or t.max() > 999), "has timesteps t outside 0..999"),
            (y is not None and y.size and (y.min() < 0 or y.max() > config.num_classes),
             f"has labels y outside 0..{config.num_classes} (classes + the null class)"),
            (x is not None and x.size and not np.isfinite(x).all(), "has NaN/Inf inputs x"),
        ]
        for bad, what in problems:
            if bad:
                raise ArtifactError(f"calibration set {name}: its {label}data {what}; the calibration set is at "
                                    "fault, not the model: recapture it with `ditdeploy calibrate` from this model")


def load_calibration(path: str | os.PathLike, verify: bool = True) -> CalibrationSet:
    """Load a calibration set written by :func:`capture_calibration_set` (manifest and sha256 checked)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"no such calibration set: {path} (create one with `ditdeploy calibrate`)")
    m = Manifest.load(path, verify=verify)
    assert m is not None
    if m.kind != KIND:
        raise ArtifactError(f"{path.name} is a {m.kind!r} artifact, not a calibration set")
    arrays = _read_npz(path)
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise ArtifactError(f"{path.name} lacks arrays {missing}: recapture it with `ditdeploy calibrate`")
    n = arrays["x"].shape[0]
    if arrays["x"].ndim != 4 or any(arrays[k].shape != (n,) for k in ARRAYS[1:]):
        raise ArtifactError(f"{path.name} has inconsistent array shapes: recapture it")
    if not np.isfinite(arrays["x"]).all():
        raise ArtifactError(f"{path.name} has NaN/Inf in its inputs x: the source model was broken; recapture it "
                            "from a working fp32 model")
    val = None
    vinfo = m.section("validation")
    if VAL_PREFIX + "x" in arrays:
        val = {k: arrays[VAL_PREFIX + k] for k in (*ARRAYS, "out") if VAL_PREFIX + k in arrays}
    elif vinfo.get("file") and vinfo.get("file") != path.name:
        vpath = path.parent / Path(str(vinfo["file"])).name
        if vpath.exists():
            vm = Manifest.load(vpath, verify=verify)
            if vm is not None and vm.get("role") == "validation":
                val = _read_npz(vpath)
    if val is not None and "out" in val and (val["out"].shape[0] != val["x"].shape[0]
                                              or not np.isfinite(val["out"]).all()):
        raise ArtifactError(f"{path.name}: the recorded validation outputs do not match its inputs; recapture it")
    sha = m.files[path.name]["sha256"] if path.name in m.files else sha256_file(path)
    return CalibrationSet(x=arrays["x"], t=arrays["t"], y=arrays["y"], step=arrays["step"], sample=arrays["sample"],
                          manifest=m, sha256=sha, path=path, val=val)


def describe(m: dict[str, Any]) -> str:
    """One-line summary of a calibration manifest for CLI output."""
    m = Manifest.of(m)
    c, s, val = m.section("counts"), m.section("sampler"), m.section("validation")
    v = val.get("counts") if isinstance(val.get("counts"), dict) else {}
    src = str(val.get("source") or "")
    where = "the unkept calls of the same trajectories" if src.startswith(VAL_UNKEPT) else f"seed {val.get('seed', '-')}"
    b = m.section("budget")
    budget = (f" (the work budget: {b.get('macs', 0) / 1e12:g} T MACs, {b.get('macs_per_trajectory', 0) / 1e12:.3g} T "
              "each)" if b.get("samples_from") == "budget" else "")
    return (f"{c.get('inputs')} inputs ({c.get('cond')} cond + {c.get('uncond')} uncond) from {c.get('samples')} "
            f"trajector{'y' if c.get('samples') == 1 else 'ies'}{budget} x {m.get('timesteps_per_trajectory')} of {s.get('steps')} {s.get('method')} steps, "
            f"{c.get('timesteps')} distinct t, cfg {s.get('cfg_scale')}; validation {v.get('inputs', 0)} inputs "
            f"({where})")
