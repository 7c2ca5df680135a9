"""``sample()``: classifier-free-guided sampling over a denoiser callable (the public entry point)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ditdeploy.diffusion import samplers
from ditdeploy.diffusion.registry import SAMPLERS, get_sampler, sampling_timesteps
from ditdeploy.diffusion.schedule import NUM_TRAIN_TIMESTEPS, base_schedule
from ditdeploy.errors import DitDeployError, NumericsError
from ditdeploy.run.watched import ensure_finite

__all__ = ["Denoiser", "GuidedModel", "check_cache_interval", "check_settings", "denoiser_name", "guided_steps",
           "parse_cfg_interval", "sample"]

Denoiser = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Interval = tuple[int, int]


def parse_cfg_interval(value: object) -> Interval | None:
    """Validate a guidance interval: ``None``/``""`` (off), ``"LO,HI"`` or a pair of ints, original timesteps.

    Inclusive, ``0 <= LO <= HI <= 999``; guidance is applied at a sampled timestep t iff ``LO <= t <= HI``.
    Raises ``DitDeployError`` (one line) for anything else.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts: list[object]
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    elif isinstance(value, (tuple, list)):
        parts = list(value)
    else:
        raise DitDeployError(f"cfg interval must be 'LO,HI' or a (lo, hi) pair, got {value!r}")
    try:
        lo, hi = (int(p) if isinstance(p, str) else p for p in parts)  # type: ignore[misc]
    except ValueError as e:
        raise DitDeployError(f"cfg interval must be two integer timesteps 'LO,HI' (e.g. 150,750), got {value!r}") from e
    if not (_is_int(lo) and _is_int(hi)):
        raise DitDeployError(f"cfg interval must be two integer timesteps 'LO,HI' (e.g. 150,750), got {value!r}")
    if not 0 <= lo <= hi <= NUM_TRAIN_TIMESTEPS - 1:
        raise DitDeployError(
            f"cfg interval {lo},{hi} must satisfy 0 <= LO <= HI <= {NUM_TRAIN_TIMESTEPS - 1} (original timesteps)"
        )
    return int(lo), int(hi)


def check_cache_interval(cache_interval: object, denoiser: object = None) -> None:
    """``None`` or an integer >= 1, and (given a denoiser) one that can reuse features; else ``DitDeployError``."""
    if cache_interval is None:
        return
    if not _is_int(cache_interval) or cache_interval < 1:  # type: ignore[operator]
        raise DitDeployError(f"cache interval must be an integer >= 1 (1 = full work every step), got {cache_interval!r}")
    if denoiser is not None and not getattr(denoiser, "supports_cache", False):
        raise DitDeployError(
            f"denoiser {denoiser_name(denoiser)} cannot reuse features: use the torch backend or an artifact "
            "exported with `ditdeploy export --cache-graphs`"
        )


def guided_steps(timesteps: object, cfg_scale: float, interval: Interval | None) -> list[bool]:
    """Per sampled timestep: is classifier-free guidance applied there (doubled batch) or only the cond half?"""
    if cfg_scale == 1.0:
        return [False for _ in timesteps]  # type: ignore[attr-defined]
    if interval is None:
        return [True for _ in timesteps]  # type: ignore[attr-defined]
    lo, hi = interval
    return [bool(lo <= int(t) <= hi) for t in timesteps]  # type: ignore[attr-defined]


def denoiser_name(denoiser: object) -> str:
    """A short name for messages: ``denoiser.name`` if set, else the function's or the class's name."""
    name = getattr(denoiser, "name", None)
    if isinstance(name, str) and name:
        return name
    qual = getattr(denoiser, "__qualname__", None)
    return qual if isinstance(qual, str) else type(denoiser).__name__


class GuidedModel:
    """Wraps ``denoiser(x, t, y)`` into the samplers' ``model(x, step_index, t)`` with classifier-free guidance.

    Guided (``cfg_scale != 1``): one denoiser call per step on ``[x; x]``, ``t`` doubled, ``y = [labels; null]``;
    eps channels ``0..k-1`` (``k = min(3, C)``, the official quirk, or ``C`` with ``guide_all_channels``) become
    ``uncond + s * (cond - uncond)``, all other channels (remaining eps and the variance) come from the cond half.
    This is the first half of the official ``forward_with_cfg`` output. Unguided: one call on ``x`` with ``labels``.
    ``interval=(lo, hi)`` (limited-interval guidance, Kynkäänniemi et al. 2024): guided only at original timesteps
    ``lo <= t <= hi``; at any other step one call on ``x`` with ``labels`` (half the rows) and its output unchanged.
    ``cache_interval=N`` (feature reuse): steps ``0, N, 2N, ...`` call ``denoiser.forward_full`` (output + feature
    cache), the others ``denoiser.forward_light`` with the cached rows; a step whose rows the cache cannot serve
    (e.g. a guided 2B-row step after a B-row full step) runs full.
    Each call's output is shape-checked and must be finite (``NumericsError`` otherwise).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        labels: np.ndarray,
        *,
        cfg_scale: float = 1.0,
        null_class: int | None = None,
        guide_all_channels: bool = False,
        channels: int,
        num_steps: int,
        interval: Interval | None = None,
        cache_interval: int | None = None,
    ):
        self.denoiser = denoiser
        self.name = denoiser_name(denoiser)
        self.guided = cfg_scale != 1.0
        self.scale = np.float32(cfg_scale)
        self.channels = channels
        self.k = channels if guide_all_channels else min(3, channels)
        self.num_steps = num_steps
        self.interval = interval
        self.cache_interval = cache_interval
        self._cache: np.ndarray | None = None
        self._cache_y: np.ndarray | None = None
        labels = np.asarray(labels, dtype=np.int64)
        self.batch = labels.shape[0]
        if self.guided:
            if null_class is None:
                raise DitDeployError("cfg_scale != 1 needs num_classes (the null class id); pass num_classes=")
            self.y = np.concatenate([labels, np.full_like(labels, null_class)])
        else:
            self.y = labels
        self.labels = labels

    def guides(self, t: int) -> bool:
        """Whether the step at original timestep ``t`` is guided (doubled batch)."""
        if not self.guided:
            return False
        return self.interval is None or self.interval[0] <= t <= self.interval[1]

    def _evaluate(self, x: np.ndarray, t: np.ndarray, y: np.ndarray, step_index: int) -> np.ndarray:
        """One denoiser evaluation: plain, or full/light under feature reuse."""
        if self.cache_interval is None:
            return self.denoiser(x, t, y)
        n = y.shape[0]
        cy = self._cache_y
        if step_index % self.cache_interval and cy is not None and cy.shape[0] >= n and np.array_equal(cy[:n], y):
            assert self._cache is not None
            return self.denoiser.forward_light(x, t, y, self._cache[:n])  # type: ignore[attr-defined]
        out, self._cache = self.denoiser.forward_full(x, t, y)  # type: ignore[attr-defined]
        self._cache_y = y
        return out

    def __call__(self, x: np.ndarray, step_index: int, t: int) -> np.ndarray:
        b = self.batch
        guide = self.guides(int(t))
        xin = np.concatenate([x, x]) if guide else x
        n = xin.shape[0]
        out = np.asarray(self._evaluate(xin, np.full(n, t, dtype=np.int64), self.y if guide else self.labels,
                                        step_index))
        c = self.channels
        if out.ndim != 4 or out.shape[0] != n or out.shape[1] not in (c, 2 * c) or out.shape[2:] != x.shape[2:]:
            raise DitDeployError(
                f"denoiser {self.name} returned shape {tuple(out.shape)} for input {tuple(xin.shape)}; expected "
                f"({n}, {c} or {2 * c}, {x.shape[2]}, {x.shape[3]}): the model does not match the noise's channels/size"
            )
        if out.dtype != np.float32:
            out = out.astype(np.float32)
        ensure_finite(out, lambda _: f"denoiser {self.name} returned NaN/Inf at step {step_index + 1}/"
                                     f"{self.num_steps} (t={t}); check the model's precision (fp16/int8 overflow) "
                                     "and the inputs", NumericsError)
        if not guide:
            return out
        cond, uncond = out[:b], out[b:]
        res = cond.copy()
        k = self.k
        res[:, :k] = uncond[:, :k] + self.scale * (cond[:, :k] - uncond[:, :k])
        return res


def _resolve_num_classes(denoiser: object, num_classes: int | None) -> int | None:
    if num_classes is not None:
        return num_classes
    n = getattr(denoiser, "num_classes", None)
    if n is None:
        n = getattr(getattr(denoiser, "config", None), "num_classes", None)
    return n


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def sample(
    denoiser: Denoiser,
    noise: np.ndarray,
    labels: np.ndarray,
    *,
    method: str = "ddim",
    steps: int = 50,
    cfg_scale: float = 1.0,
    eta: float = 0.0,
    seed: int | None = None,
    rng: np.random.Generator | None = None,
    num_classes: int | None = None,
    guide_all_channels: bool = False,
    clip_denoised: bool = False,
    progress: bool = False,
    callback: samplers.Callback | None = None,
    noise_fn: samplers.NoiseFn | None = None,
    cfg_interval: object = None,
    cache_interval: int | None = None,
) -> np.ndarray:
    """Sample x_0 (float32, (B, C, H, W), latents before any VAE decode) from ``noise`` = x_T.

    - ``denoiser(x, t, y)``: x float32 (N, C, H, W), t int64 (N,) ORIGINAL timesteps 0..999, y int64 (N,) with the
      null class id = ``num_classes``; returns the model's full output, (N, C, H, W) or (N, 2C, H, W) (learned sigma).
    - ``method``: ``"ddim"`` (eta, default 0 = deterministic; "ddimN" respacing, falling back to the "N" rule when no
      integer stride gives N steps), ``"ddpm"`` (ancestral; learned-range variance with 2C outputs, the official
      fixed-large variance otherwise; "N" respacing), ``"dpm-solver++"`` (2M, N evaluations at
      round(linspace(999, 0, N)), then x_0). See ``sampling_timesteps``. ``steps``: 1..1000 model evaluations.
    - ``cfg_scale != 1``: classifier-free guidance inside the sampler (one 2B-batch call per step; see
      ``GuidedModel``); needs ``num_classes`` (or a ``num_classes``/``config.num_classes`` attribute on the denoiser).
      Equal in exact arithmetic to the official loops on ``forward_with_cfg`` with the doubled batch, first half.
    - ``cfg_interval``: ``None`` (default: guidance at every step) or ``(lo, hi)`` / ``"LO,HI"`` original timesteps,
      inclusive (``parse_cfg_interval``): guidance only at steps whose timestep lies inside; the other steps call
      the denoiser on the conditional half only (B rows instead of 2B). Kynkäänniemi et al., NeurIPS 2024.
    - ``cache_interval``: ``None`` (default, off) or N >= 1: feature reuse across steps (every N-th step computes
      all blocks; see ``GuidedModel``). Needs a denoiser with ``supports_cache`` (``forward_full(x, t, y) ->
      (out, cache)`` and ``forward_light(x, t, y, cache) -> out``): the torch backend or a ``--cache-graphs`` export.
    - Randomness (ddpm, ddim with eta > 0): ``rng`` (a numpy Generator) or ``seed``; same seed -> same output.
      ``noise_fn(step_index, shape)`` overrides both (e.g. to share per-step noise with another implementation).
    - ``callback(step_index, t_original, x)`` after each step (x is a fresh array); ``progress`` shows a tqdm bar.
    - No x_0 clipping unless ``clip_denoised`` (the official sample.py uses clip_denoised=False).

    Raises ``DitDeployError`` (one line) for bad inputs and ``NumericsError`` when the denoiser returns NaN/Inf.
    """
    interval = check_settings(method, steps, cfg_scale, eta, cfg_interval, cache_interval, denoiser=denoiser)
    _check_call(denoiser, seed, rng)
    x, y, n_cls = _check_inputs(denoiser, noise, labels, num_classes, cfg_scale)
    if cfg_scale != 1.0 and getattr(getattr(denoiser, "config", None), "class_dropout_prob", None) == 0:
        raise DitDeployError("this model was built without a null class (class_dropout_prob=0): use cfg_scale=1")

    if noise_fn is None:
        gen = rng if rng is not None else np.random.default_rng(seed)

        def noise_fn(step_index: int, shape: tuple) -> np.ndarray:
            return gen.standard_normal(shape, dtype=np.float32)

    base = base_schedule(NUM_TRAIN_TIMESTEPS)
    ts = sampling_timesteps(method, int(steps))
    model = GuidedModel(
        denoiser, y.astype(np.int64), cfg_scale=float(cfg_scale), null_class=n_cls,
        guide_all_channels=guide_all_channels, channels=x.shape[1], num_steps=int(steps), interval=interval,
        cache_interval=None if cache_interval is None else int(cache_interval),
    )
    return get_sampler(method).run(model, x, base, ts, eta=eta, noise=noise_fn, clip_denoised=clip_denoised,
                                   callback=callback, progress=progress)


_ARG_NAMES = {"method": "method", "steps": "steps", "cfg_scale": "cfg_scale", "eta": "eta"}
_FLAG_NAMES = {"method": "--sampler", "steps": "--steps", "cfg_scale": "--cfg-scale", "eta": "--eta"}


def check_settings(method: str, steps: int, cfg_scale: float | None = 1.0, eta: float = 0.0,
                   cfg_interval: object = None, cache_interval: object = None, *, denoiser: object = None,
                   flags: bool = False) -> Interval | None:
    """The one validator of sampling settings (``sample``, ``SampleRequest``, ``CaptureSettings``, the commands).

    One-line ``DitDeployError`` for an unknown sampler (:data:`registry.SAMPLERS`), a step count outside
    1..1000, a negative or non-finite guidance scale (``None``: the caller's default), a bad ``eta`` or one the
    sampler does not use, a bad guidance interval or cache interval (and, given a ``denoiser``, one that cannot
    reuse features). Messages name the flags (``--steps``) with ``flags``, else the arguments (``steps``).
    Returns the parsed guidance interval (``parse_cfg_interval``).
    """
    n = _FLAG_NAMES if flags else _ARG_NAMES
    spec = get_sampler(method)
    if not _is_int(steps) or not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise DitDeployError(f"{n['steps']} must be in 1..{NUM_TRAIN_TIMESTEPS} (an integer), got {steps!r}")
    if cfg_scale is not None and (not _is_real(cfg_scale) or not math.isfinite(cfg_scale) or cfg_scale < 0):
        raise DitDeployError(f"{n['cfg_scale']} must be a finite number >= 0 (1 = no guidance), got {cfg_scale!r}")
    if not _is_real(eta) or not math.isfinite(eta) or eta < 0:
        raise DitDeployError(f"{n['eta']} must be a finite number >= 0, got {eta!r}")
    if eta != 0 and "eta" not in spec.options:
        users = ", ".join(s.name for s in SAMPLERS.values() if "eta" in s.options)
        raise DitDeployError(f"{n['eta']} is only used by {n['method']} {users}, not {method!r}; leave it at 0")
    interval = parse_cfg_interval(cfg_interval)
    check_cache_interval(cache_interval, denoiser)
    return interval


def _check_call(denoiser: Denoiser, seed: int | None, rng: np.random.Generator | None) -> None:
    """One-line errors for a denoiser that is not callable or a bad randomness source."""
    if not callable(denoiser):
        raise DitDeployError(f"denoiser must be callable as denoiser(x, t, y), got {type(denoiser).__name__}")
    if seed is not None and rng is not None:
        raise DitDeployError("pass either seed or rng, not both")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise DitDeployError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def _check_inputs(denoiser: Denoiser, noise: np.ndarray, labels: np.ndarray, num_classes: int | None,
                  cfg_scale: float) -> tuple[np.ndarray, np.ndarray, int | None]:
    """The initial noise (a float32 copy) and labels, checked; returns (x, y, num_classes)."""
    x = np.asarray(noise)
    if x.dtype.kind != "f" or x.ndim != 4 or x.shape[0] < 1 or 0 in x.shape:
        raise DitDeployError(
            f"noise must be a float array of shape (B, C, H, W) with B >= 1, got {x.dtype} {tuple(x.shape)}"
        )
    x = x.astype(np.float32)  # a copy: the caller's array is never modified
    if not np.isfinite(x).all():
        raise DitDeployError("noise contains NaN/Inf; pass finite initial noise (e.g. rng.standard_normal)")
    y = np.asarray(labels)
    if y.dtype.kind not in "iu" or y.shape != (x.shape[0],):
        raise DitDeployError(
            f"labels must be integers of shape ({x.shape[0]},) (one per noise sample), got {y.dtype} {tuple(y.shape)}"
        )
    n_cls = _resolve_num_classes(denoiser, num_classes)
    if n_cls is not None and (not _is_int(n_cls) or n_cls < 1):
        raise DitDeployError(f"num_classes must be a positive integer, got {n_cls!r}")
    if y.size and (y.min() < 0 or (n_cls is not None and y.max() >= n_cls)):
        upper = f"{n_cls - 1}" if n_cls is not None else "..."
        raise DitDeployError(f"labels must lie in 0..{upper}, got min {y.min()} max {y.max()}")
    if cfg_scale != 1.0 and n_cls is None:
        raise DitDeployError(
            "cfg_scale != 1 needs num_classes (the null class id used for the unconditional half); pass num_classes="
        )
    return x, y, n_cls
