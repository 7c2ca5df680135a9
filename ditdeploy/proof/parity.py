"""Parity: how the project judges an artifact's numbers against a reference, in one place.

* :func:`compare` -> :class:`ParityReport`: rel-L2, cosine, max-abs, finiteness and the worst sample (row of axis 0)
  of ``actual`` against ``reference`` (float64, via the elementwise primitives of ``ditdeploy.proof.distances``).
* :data:`THRESHOLDS`: one table of pass/fail limits per precision (fp32, fp16, bf16, fp8, int8) with the reason for each
  number. Export verification, INT8 quantization, OpenVINO conversion and ``ditdeploy check`` all read it.
* :func:`compare_runs` -> :class:`RunParity`: the one "run A and B on these probe inputs and compare" (export
  verification, OpenVINO conversion, cache graphs, AOTInductor, INT8 quantization of the denoiser and the decoder,
  the diffusers snapshot): both runs on every probe, :func:`compare` per output, judged against a THRESHOLDS row.
* :func:`probe_inputs` / :func:`decoder_probe_inputs` / :func:`trajectory_probes`: the inputs parity is measured on
  (seeded random denoiser feeds when there is no reference trajectory; forward-noised reference samples when there
  is one).

Numpy only (the deploy path imports it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ditdeploy.errors import DitDeployError, NumericsError
from ditdeploy.proof import distances

NUM_TRAIN_TIMESTEPS = 1000


# --------------------------------------------------------------------------------------------------------------------
# compare()
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParityReport:
    """The parity numbers of one comparison (all computed in float64)."""

    rel_l2: float  # ||a - r|| / ||r|| over everything
    cosine: float  # cosine similarity of the flattened arrays
    max_abs: float  # largest |a - r|
    finite: bool  # no NaN/Inf in ``actual``
    worst_sample: int | None  # row of axis 0 with the largest rel-L2 (None for scalars / empty arrays)
    worst_sample_rel_l2: float  # that row's rel-L2
    samples: int  # rows along axis 0

    def metrics(self) -> dict[str, Any]:
        """The four-number summary recorded in manifests: rel_l2, cosine, max_abs, finite."""
        return {"rel_l2": self.rel_l2, "cosine": self.cosine, "max_abs": self.max_abs, "finite": self.finite}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def failures(self, th: Thresholds, what: str = "") -> list[str]:
        """Messages for each per-call limit of ``th`` this comparison misses (empty when it passes)."""
        where = f" {what}" if what else ""
        out = []
        if not self.finite:
            out.append(f"NaN/Inf in the output{where}")
        if th.call_rel_l2 is not None and not self.rel_l2 <= th.call_rel_l2:
            out.append(f"rel-L2 {self.rel_l2:.3g} > {th.call_rel_l2:g}{where}")
        if th.call_cosine is not None and not self.cosine >= th.call_cosine:
            out.append(f"cosine {self.cosine:.6f} < {th.call_cosine:g}{where}")
        return out


def compare(actual: Any, reference: Any) -> ParityReport:
    """Compare ``actual`` with ``reference`` (same shape): rel-L2, cosine, max-abs, finiteness, worst sample."""
    a, r = np.asarray(actual), np.asarray(reference)
    if a.shape != r.shape:
        raise DitDeployError(f"cannot compare outputs of shape {a.shape} with a reference of shape {r.shape}")
    worst, worst_rel, n = None, 0.0, (int(a.shape[0]) if a.ndim else 0)
    if a.ndim and n:
        per = [distances.rel_l2(a[i], r[i]) for i in range(n)]
        worst = int(np.argmax(per))
        worst_rel = float(per[worst])
    return ParityReport(rel_l2=distances.rel_l2(a, r), cosine=distances.cosine(a, r), max_abs=distances.max_abs(a, r),
                        finite=bool(np.isfinite(a).all()), worst_sample=worst, worst_sample_rel_l2=worst_rel,
                        samples=n)


# --------------------------------------------------------------------------------------------------------------------
# Thresholds: one table
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits for one precision. ``None`` disables a gate. max-abs is reported but never gated: it scales
    with the output's magnitude (eps predictions are O(1) but the learned-sigma channels are not).

    ``call_*`` limits judge one comparison of denoiser (or decoder) outputs on the same inputs: one probe call in
    ``check``, the whole validation set in INT8 quantization, one batch in export verification / OpenVINO
    conversion. The others judge a whole sampling run (``check`` end to end); ``psnr`` also judges one comparison
    whose outputs are images (:func:`compare_runs` with ``data_range``: the INT8 VAE decoder)."""

    call_rel_l2: float | None  # max rel-L2 of one comparison of outputs
    call_cosine: float | None  # min cosine of one comparison of outputs
    latent_rel_l2: float | None  # max rel-L2 of the final latents (x_0) after the whole sampling loop
    psnr: float | None  # min PSNR (dB) of the final images, data range 255 (or of one decoder comparison)
    ssim: float | None  # min mean SSIM of the final images
    reason: str = ""

    def replace(self, **kw: float | None) -> Thresholds:
        """A copy with the given limits replaced (``None`` values are ignored: keep the table's)."""
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})

    def tolerance(self) -> dict[str, float]:
        """The per-call limits as recorded in export manifests (``parity.tolerance``)."""
        return {k: v for k, v in (("rel_l2", self.call_rel_l2), ("cosine", self.call_cosine)) if v is not None}


# Why these numbers (docs/proof.md "Proof: check and bench" and docs/parity.md say the same):
# fp32: the artifact computes the same function in the same format; only the order of float additions differs
#       (fused kernels, different GEMM blocking), giving ~1e-7..1e-5 relative error per call (export verification
#       measures ~1e-6 even for 28 blocks; a wrong graph, e.g. the legacy exporter's, is >= 1e-2). 1e-4 per call
#       leaves 10x margin and still separates a broken graph by 100x. Over the sampling loop these errors are carried,
#       not amplified much by DDIM/DPM-Solver (deterministic, contractive at the end), so final latents within 1e-3
#       and images >= 40 dB PSNR are expected. The VAE decoder (fp32 convolutions) uses the same row.
# fp16: 11-bit mantissa, unit round-off 4.9e-4 per operation; errors of independent roundings grow ~sqrt(#ops) and the
#       residual stream adds them over depth: measured 4.9e-4 per call for an S/2-sized model. 5e-3 allows 10x
#       that for deeper models (XL has 28 blocks), still far below a broken graph. End to end: 5e-2 latent rel-L2,
#       30 dB.
# bf16: 8-bit mantissa, round-off 3.9e-3 (8x fp16); OpenVINO's bf16 hint measured 2% rel-L2 on an XL/2-sized random
#       model and up to 5.6% on the shipped digits model (worst at t=0, where the eps target is hardest). Per call
#       0.1 / cosine 0.995; end to end 0.15 and 25 dB (digits measured 1% and 48 dB).
# int8: not a rounding of the same function but an approximation (8-bit weights/activations, ~0.4% step of the
#       clipped range); PTQ work on DiT (PTQ4DiT, Q-DiT) judges layers by cosine. Cosine >= 0.99 (rel-L2 <= 0.15,
#       which is what cosine 0.99 allows). This one number is used by `check` (each probe call) and by the INT8
#       quantizer (all validation outputs): the quantizer used 0.98 before, so it could write an artifact that
#       `check` then failed; on the trained digits model static INT8 measures 0.9998 over the validation set and
#       entropy ranges 0.998, both clear 0.99, while a wrong scale or a quantized embedding table falls far below.
#       End to end the trajectories may drift apart: 20 dB PSNR, SSIM 0.8 ("visibly the same image"), latent
#       rel-L2 0.3.
# fp8:  E4M3 token GEMMs (3-bit mantissa, per-channel weight / per-tensor activation scales, export/fp8.py) inside a
#       bf16 model: an approximation like int8, judged by cosine at the GPU issue's bar (per call >= 0.995); end to
#       end the int8 limits.
# int8-decoder: the INT8 VAE decoder (experiments/vae_int8.py) against its fp32 source on the same latents, judged
#       on the decoded images (pixels 0..255 after the [-1, 1] clamp) by PSNR only: below 30 dB the decoded images
#       differ visibly from the fp32 decoder's (the quantizer's limit since it was written; an SD-VAE-sized decoder
#       measured 41.6 dB, docs/less-work.md). Not a precision of a denoiser: `check` never picks it.
THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(1e-4, 0.99999, 1e-3, 40.0, 0.99, "same function, float reassociation only"),
    "fp16": Thresholds(5e-3, 0.9999, 5e-2, 30.0, 0.95, "11-bit mantissa accumulated over depth"),
    "bf16": Thresholds(0.1, 0.995, 0.15, 25.0, 0.90, "8-bit mantissa (bf16 inference hint)"),
    "int8": Thresholds(0.15, 0.99, 0.30, 20.0, 0.80, "8-bit quantisation: an approximation, judged by cosine"),
    "fp8": Thresholds(0.15, 0.995, 0.30, 20.0, 0.80, "E4M3 token GEMMs in bf16: an approximation, judged by cosine"),
    "int8-decoder": Thresholds(None, None, None, 30.0, None, "INT8 VAE decoder vs fp32: images within 30 dB PSNR"),
}

_ALIASES = {"f32": "fp32", "float32": "fp32", "f16": "fp16", "float16": "fp16", "half": "fp16",
            "bfloat16": "bf16", "qdq": "int8", "i8": "int8"}
_LOSS_ORDER = ("fp32", "fp16", "bf16", "fp8", "int8")


def precision_key(name: str) -> str:
    """Canonical precision name (``f16``/``float16``/``half`` -> ``fp16`` ...); unknown names pass through."""
    key = str(name).strip().lower()
    return _ALIASES.get(key, key)


def thresholds_for(precision: str) -> Thresholds:
    """The documented thresholds of a precision name (fp32, fp16, bf16, fp8, int8 and their aliases)."""
    key = precision_key(precision)
    if key not in THRESHOLDS:
        raise DitDeployError(f"unknown precision {precision!r}: choose one of {', '.join(THRESHOLDS)}")
    return THRESHOLDS[key]


def tolerance_for(precision: str) -> dict[str, float]:
    """The per-call gate of ``precision`` as export manifests record it: ``{"rel_l2": ..., "cosine": ...}``."""
    return thresholds_for(precision).tolerance()


def lossiest(*precisions: str | None) -> str:
    """The lossiest of known precision names (fp32 < fp16 < bf16 < fp8 < int8); the first name when none is known."""
    found = [precision_key(p) for p in precisions if p]
    known = [p for p in found if p in _LOSS_ORDER]
    return max(known, key=_LOSS_ORDER.index) if known else (found[0] if found else "fp32")


def effective_precision(denoiser: Any) -> str:
    """The precision a loaded denoiser is judged at: the lossier of the artifact's (manifest ``precision``) and the
    arithmetic the runtime reports (its name ends e.g. ``openvino:CPU:fp32->bf16`` when an inference-precision hint
    overrides the artifact's). An int8 artifact stays int8 even where a runtime computes it in f32."""
    from ditdeploy.artifact.manifest import Manifest

    found = [Manifest.of(getattr(denoiser, "manifest", None)).precision]
    name = str(getattr(denoiser, "name", ""))
    if ":" in name:
        found += name.rsplit(":", 1)[-1].split("->")
    return lossiest(*found)


# --------------------------------------------------------------------------------------------------------------------
# compare_runs(): run A and B on the same probe inputs and judge
# --------------------------------------------------------------------------------------------------------------------
Feeds = Mapping[str, np.ndarray]
Run = Callable[[Feeds], Any]  # feeds -> an output array, or {output name: array} for a model with several outputs


@dataclass(frozen=True)
class ProbeParity:
    """One output of one probe: its :class:`ParityReport`, the reference's RMS and (images) PSNR."""

    probe: int  # index into the probes
    output: str | None  # output name when the runs return several, else None
    batch: int  # rows of the probe's first input
    report: ParityReport
    reference_rms: float  # sqrt(mean(reference^2)): 0 means the comparison proves nothing
    psnr: float | None = None  # with ``data_range`` only

    def where(self) -> str:
        name = f"output {self.output} " if self.output else ""
        return f"{name}at probe {self.probe + 1} (batch {self.batch})"


@dataclass(frozen=True)
class RunParity:
    """What :func:`compare_runs` measured (and passed): one :class:`ProbeParity` per probe and output, the pooled
    comparison (all probes' outputs concatenated) when asked for, and the limits it was judged against."""

    what: str
    against: str
    thresholds: Thresholds | None
    probes: tuple[ProbeParity, ...]
    pooled: dict[str | None, ParityReport]  # per output; empty unless ``pooled``
    pooled_psnr: dict[str | None, float]  # per output; with ``pooled`` and ``data_range``
    kept: tuple[tuple[dict[str | None, np.ndarray], dict[str | None, np.ndarray]], ...] = ()  # (actual, reference)

    def of(self, output: str | None = None) -> list[ProbeParity]:
        """The per-probe comparisons of one output."""
        return [p for p in self.probes if p.output == output]

    def worst(self, output: str | None = None) -> dict[str, float]:
        """Worst values over the probes of one output: max rel-L2, min cosine, max max-abs."""
        reps = [p.report for p in self.of(output)]
        return {"rel_l2": max(r.rel_l2 for r in reps), "cosine": min(r.cosine for r in reps),
                "max_abs": max(r.max_abs for r in reps)}

    def stacked(self, output: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Both runs' kept outputs (``keep_outputs``) of every probe, concatenated along axis 0: (actual, reference)."""
        if not self.kept:
            raise DitDeployError("compare_runs kept no outputs (keep_outputs=False)")
        return (np.concatenate([a[output] for a, _ in self.kept]), np.concatenate([r[output] for _, r in self.kept]))

    def rows(self, output: str | None = None) -> list[ParityReport]:
        """One :func:`compare` per row (axis 0) of the kept outputs of every probe (per-call numbers of a batch)."""
        a, r = self.stacked(output)
        return [compare(a[i], r[i]) for i in range(a.shape[0])]

    def tolerance(self) -> dict[str, float]:
        """The per-call limits judged against, as manifests record them."""
        return self.thresholds.tolerance() if self.thresholds is not None else {}


def _outputs(out: Any) -> dict[str | None, np.ndarray]:
    if isinstance(out, Mapping):
        return {str(k): np.asarray(v) for k, v in out.items()}
    return {None: np.asarray(out)}


def _rows(feeds: Feeds) -> int:
    first = np.asarray(next(iter(feeds.values())))
    return int(first.shape[0]) if first.ndim else 1


def _probe(i: int, feeds: Feeds, act: dict, ref: dict, what: str, against: str,
           data_range: float | None) -> list[ProbeParity]:
    if set(act) != set(ref):
        raise NumericsError(f"{what} returns outputs {sorted(map(str, act))}, {against} {sorted(map(str, ref))}")
    out = []
    for name, a in act.items():
        r = ref[name]
        if a.shape != r.shape:
            label = f" output {name}" if name else " output"
            raise NumericsError(f"{what}{label} shape {a.shape} != {against}'s {r.shape} at probe {i + 1}: "
                                "the artifact's graph is wrong")
        rms = float(np.sqrt(np.mean(np.square(r, dtype=np.float64)))) if r.size else 0.0
        psnr = distances.psnr(a, r, data_range) if data_range is not None else None
        out.append(ProbeParity(i, name, _rows(feeds), compare(a, r), rms, psnr))
    return out


def _judge(th: Thresholds | None, items: list[tuple[ParityReport, float | None, str]]) -> list[str]:
    """Misses of ``th``: NaN/Inf, per-call rel-L2 / cosine and, for images, PSNR, each with where it happened."""
    out: list[str] = []
    for rep, psnr, where in items if th is not None else []:
        out += rep.failures(th, where)
        if psnr is not None and th.psnr is not None and not psnr >= th.psnr:
            out.append(f"PSNR {psnr:.1f} dB < {th.psnr:g} dB {where}")
    return sorted(out, key=lambda m: not m.startswith("NaN"))  # a NaN is named first


def _pool(kept: list, names: list[str | None], data_range: float | None) -> tuple[dict, dict]:
    """Per output: :func:`compare` (and PSNR with ``data_range``) of all probes' outputs concatenated on axis 0."""
    pool, pool_psnr = {}, {}
    for name in names:
        a, r = (np.concatenate([k[j][name] for k in kept]) for j in (0, 1))
        pool[name] = compare(a, r)
        if data_range is not None:
            pool_psnr[name] = distances.psnr(a, r, data_range)
    return pool, pool_psnr


def compare_runs(reference: Run | Sequence[Any], candidate: Run, probes: Sequence[Feeds], *,
                 thresholds: Thresholds | str | None, what: str, against: str = "the reference",
                 pooled: bool = False, data_range: float | None = None, keep_outputs: bool = False,
                 judge: Sequence[str | None] | None = None, hint: str = "nothing was written",
                 progress: bool = False) -> RunParity:
    """Run ``reference`` and ``candidate`` on every probe, :func:`compare` their outputs and judge them against
    ``thresholds`` (a THRESHOLDS row or its precision name; None records without judging). A miss raises
    NumericsError "``what`` differs from ``against``: <first miss>; ``hint``".

    ``reference`` may also be its outputs already computed, one per probe. A run returns an array or a dict of named
    arrays (each output compared on its own). Every probe is judged on its own, or with ``pooled`` one comparison
    of all probes' outputs concatenated along axis 0 (a validation set judged as a whole). ``data_range``: the
    outputs are images of that range; their PSNR is recorded and gated by the row's ``psnr``. ``judge``: the output
    names judged (default all; the others are recorded). ``keep_outputs``: keep both runs' outputs
    (:meth:`RunParity.stacked`, :meth:`RunParity.rows`)."""
    th = thresholds_for(thresholds) if isinstance(thresholds, str) else thresholds
    order: Any = range(len(probes))
    if progress:
        from tqdm import tqdm

        order = tqdm(order, desc=what, unit="probe", dynamic_ncols=True)
    entries: list[ProbeParity] = []
    kept = []
    for i in order:
        ref = _outputs(reference(probes[i]) if callable(reference) else reference[i])
        act = _outputs(candidate(probes[i]))
        entries += _probe(i, probes[i], act, ref, what, against, data_range)
        if keep_outputs or pooled:
            kept.append((act, ref))
    pool, pool_psnr = _pool(kept, list(dict.fromkeys(e.output for e in entries)) if pooled else [], data_range)
    if pooled:
        rows = sum(_rows(f) for f in probes)
        items = [(rep, pool_psnr.get(n), f"{f'output {n} ' if n else ''}over all {rows} rows of {len(probes)} probes")
                 for n, rep in pool.items() if judge is None or n in judge]
    else:
        items = [(e.report, e.psnr, e.where()) for e in entries if judge is None or e.output in judge]
    fails = _judge(th, items)
    if fails:
        more = f" (and {len(fails) - 1} more)" if len(fails) > 1 else ""
        raise NumericsError(f"{what} differs from {against}: {fails[0]}{more}" + (f"; {hint}" if hint else ""))
    return RunParity(what, against, th, tuple(entries), pool, pool_psnr, tuple(kept) if keep_outputs else ())


# --------------------------------------------------------------------------------------------------------------------
# Probe inputs
# --------------------------------------------------------------------------------------------------------------------
def probe_inputs(config: Any, batch_sizes: Sequence[int] = (1, 3), seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Seeded denoiser feeds ``{"x", "t", "y"}``, one per batch size, for a ``DiTConfig``.

    x ~ N(0, 1) like a diffusion state x_t; timesteps spread evenly over 0..999 across all rows (shuffled when more
    than two); labels random, with the null class (``num_classes``) in every batch of two or more (row 1) and in
    every other single-row batch, so both CFG halves are exercised.
    """
    rng = np.random.default_rng(seed)
    total = int(sum(batch_sizes))
    ts = np.rint(np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, total)).astype(np.int64)
    ts = ts[rng.permutation(total)] if total > 2 else ts
    feeds, k = [], 0
    for i, b in enumerate(batch_sizes):
        x = rng.standard_normal((b, config.in_channels, config.input_size, config.input_size)).astype(np.float32)
        y = rng.integers(0, config.num_classes, size=b).astype(np.int64)
        if b >= 2:
            y[1] = config.null_class
        elif i % 2 == 1:
            y[0] = config.null_class
        feeds.append({"x": x, "t": ts[k:k + b].copy(), "y": y})
        k += b
    return feeds


def stacked_probe_inputs(config: Any, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` rows of :func:`probe_inputs` as one set (pairs of rows, the second of each pair the null class)."""
    feeds = probe_inputs(config, [2] * (n // 2) + ([1] if n % 2 else []), seed)
    return {k: np.concatenate([f[k] for f in feeds]) for k in ("x", "t", "y")}


def decoder_probe_inputs(latent_channels: int, sizes: Sequence[int], batch_sizes: Sequence[int],
                         seed: int = 0) -> list[dict[str, np.ndarray]]:
    """VAE decoder feeds ``{"latents"}``: N(0, 1) like sampled latents, one per (batch, size) pair, zipped
    cyclically."""
    rng = np.random.default_rng(seed)
    n = max(len(sizes), len(batch_sizes))
    feeds = []
    for i in range(n):
        b, s = batch_sizes[i % len(batch_sizes)], sizes[i % len(sizes)]
        feeds.append({"latents": rng.standard_normal((b, latent_channels, s, s)).astype(np.float32)})
    return feeds


def probe_timesteps(n: int) -> np.ndarray:
    """``n`` timesteps spread evenly over 0..999, both ends included (n=1 -> [999])."""
    if n < 1:
        raise DitDeployError("--timesteps must be >= 1")
    if n == 1:
        return np.array([NUM_TRAIN_TIMESTEPS - 1], dtype=np.int64)
    return np.unique(np.round(np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, n)).astype(np.int64))


def trajectory_probes(config: Any, x0: np.ndarray, labels: np.ndarray, timesteps: np.ndarray, seed: int):
    """Per-call inputs on the sampler's path: for each t, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` from the
    reference's own samples ``x0``, rows ``[cond labels; null class]``. Returns stacked (x, t, y)."""
    from ditdeploy.diffusion import base_schedule

    abar = np.asarray(base_schedule().alphas_cumprod, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    b = x0.shape[0]
    xs, ts, ys = [], [], []
    y = np.concatenate([labels.astype(np.int64), np.full(b, config.null_class, dtype=np.int64)])
    for t in timesteps:
        eps = rng.standard_normal(x0.shape)
        xt = math.sqrt(abar[t]) * x0.astype(np.float64) + math.sqrt(1.0 - abar[t]) * eps
        xt = xt.astype(np.float32)
        xs.append(np.concatenate([xt, xt]))
        ts.append(np.full(2 * b, t, dtype=np.int64))
        ys.append(y)
    return np.stack(xs), np.stack(ts), np.stack(ys)
