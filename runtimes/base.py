"""Pieces every backend shares: manifest reading, input checks, batch chunking, and the timing wrapper.

Numpy + stdlib only (the deploy path must not import torch).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.artifact.manifest import Manifest
from ditdeploy.config.variants import LATENT_CHANNELS, DiTConfig
from ditdeploy.errors import ArtifactError, DitDeployError, MissingDependencyError
from ditdeploy.run.watched import Watched

DENOISER_INPUTS = ("x", "t", "y")
DENOISER_OUTPUT = "out"
DECODER_INPUT = "latents"
DECODER_OUTPUT = "image"
log = logging.getLogger("ditdeploy.runtimes")
_SAID: set[str] = set()


def missing(module: str, message: str) -> MissingDependencyError:
    """A MissingDependencyError with a custom one-line message (for packages that are not a ditdeploy extra)."""
    err = MissingDependencyError(module, "dev")
    err.args = (message,)
    return err


def physical_cores() -> int:
    """Physical cores usable by this process (affinity-aware); the default intra-op thread count."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # pragma: no cover - psutil is a core dependency
        n = os.cpu_count() or 1
    try:
        n = min(n, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        pass
    return max(1, int(n))


def read_manifest(path: str | os.PathLike, kind: str, verify: bool = True) -> Manifest:
    """Load and sha256-verify the manifest beside ``path`` and check it describes a ``kind`` artifact."""
    m = Manifest.load(path, verify=verify)
    assert m is not None
    return m.require_kind(kind)


def int8_saturates_here(m: Manifest, path: str | os.PathLike, runtime: str, remedy: str) -> bool:
    """True when ``m`` is an INT8 artifact with full-range int8 weights and this CPU has no VNNI (its u8s8 kernels
    pair-add into saturating int16 lanes: ``ditdeploy.system.cpu_isa``); says so in one warning line, once per artifact and
    process. ``remedy``: what the runtime does about it."""
    from ditdeploy.system.cpu_isa import detect

    isa = detect()
    if not (m.int8_full_range and isa.int8_saturates):
        return False
    key = f"{runtime}:{Path(path).resolve()}"
    if key not in _SAID:
        _SAID.add(key)
        log.warning("warning: %s has full-range int8 weights and this CPU has no VNNI (%s): %s's int8 kernels can "
                    "saturate; %s. Re-export with `--int8-target cpu-avx2` (7-bit weights) for this CPU",
                    Path(path).name, isa.label(), runtime, remedy)
    return True


def check_dims(what: str, declared: Sequence[Any], expected: Sequence[int | None], path: str | os.PathLike) -> None:
    """Compare an artifact's declared tensor dims with those the manifest implies.

    ``declared`` entries that are not positive ints (symbolic names, None, -1) are dynamic and accepted;
    ``expected`` entries that are None are not checked.
    """
    if len(declared) != len(expected):
        raise ArtifactError(
            f"{Path(path).name}: input {what!r} has rank {len(declared)}, the manifest implies {len(expected)}"
        )
    for d, e in zip(declared, expected, strict=True):
        if isinstance(d, (int, np.integer)) and int(d) > 0 and e is not None and int(d) != e:
            raise ArtifactError(
                f"{Path(path).name}: {what!r} has shape {list(declared)}, but its manifest's config implies "
                f"{['N' if x is None else x for x in expected]}: the artifact and manifest do not belong together"
            )


def denoiser_shapes(cfg: DiTConfig) -> dict[str, tuple[int | None, ...]]:
    """Expected I/O shapes (None = batch) of a denoiser for ``cfg``."""
    s, c = cfg.input_size, cfg.in_channels
    return {"x": (None, c, s, s), "t": (None,), "y": (None,), "out": (None, cfg.out_channels, s, s)}


def cache_shape(cfg: DiTConfig) -> tuple[int, int, int]:
    """Per-row feature-cache shape (2 * depth, tokens, hidden) of a DiT config."""
    return (2 * cfg.depth, (cfg.input_size // cfg.patch_size) ** 2, cfg.hidden_size)


def light_graph(path: str | os.PathLike, m: dict[str, Any]) -> tuple[Path, str] | None:
    """The light graph of a two-graph (``--cache-graphs``) artifact and its export id; None for a plain artifact.

    Raises ``ArtifactError`` (one line) when the manifest's ``cache_graphs`` entry is malformed or its file missing.
    """
    from ditdeploy.artifact.files import safe_member

    cg = m.get("cache_graphs")
    if cg is None:
        return None
    name = Path(path).name
    if not isinstance(cg, dict) or not isinstance(cg.get("light"), str) or not isinstance(cg.get("export_id"), str):
        raise ArtifactError(f"the manifest of {name} has a malformed 'cache_graphs' entry: re-export with --cache-graphs")
    light = safe_member(Path(path).parent, cg["light"])
    if not light.exists():
        raise ArtifactError(f"two-graph artifact {name}: its light graph {light.name} is missing; copy it beside "
                            f"{name} or re-export with --cache-graphs")
    return light, cg["export_id"]


def check_export_id(what: Path, got: str | None, want: str) -> None:
    """Refuse a graph whose recorded export id differs from the manifest's (a graph from another export)."""
    if got is not None and got != want:
        raise ArtifactError(f"{what.name} comes from another export (export id {got[:8]}…, manifest {want[:8]}…): "
                            "keep the two graphs of one `ditdeploy export --cache-graphs` together")


def chunked(fn: Callable[..., np.ndarray], arrays: Sequence[np.ndarray], max_batch: int | None) -> np.ndarray:
    """Call ``fn(*arrays)`` in slices of at most ``max_batch`` rows and concatenate the results."""
    n = arrays[0].shape[0]
    if not max_batch or n <= max_batch:
        return fn(*arrays)
    outs = [fn(*(a[i : i + max_batch] for a in arrays)) for i in range(0, n, max_batch)]
    return np.concatenate(outs, axis=0)


def prepare_denoiser_inputs(
    x: Any, t: Any, y: Any, cfg: DiTConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cast to the contract dtypes (x float32, t/y int64), make contiguous, and check shapes against ``cfg``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise DitDeployError(f"denoiser input x must be (N, C, H, W), got shape {x.shape}")
    n = x.shape[0]
    t = np.asarray(t)
    if t.ndim == 0:
        t = np.full((n,), t)
    y = np.asarray(y)
    if y.ndim == 0:
        y = np.full((n,), y)
    t = np.ascontiguousarray(t, dtype=np.int64)
    y = np.ascontiguousarray(y, dtype=np.int64)
    want = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if tuple(x.shape[1:]) != want:
        raise DitDeployError(f"denoiser input x has shape {x.shape}, the model takes (N, {', '.join(map(str, want))})")
    if t.shape != (n,) or y.shape != (n,):
        raise DitDeployError(f"t and y must have shape ({n},), got {t.shape} and {y.shape}")
    return x, t, y


class DenoiserBase:
    """Common behaviour of all backends: input checks and chunking to the artifact's max batch.

    Subclasses set ``name``, ``config``, ``manifest``, ``max_batch`` and implement ``_run(x, t, y)`` for a batch
    that fits.
    """

    name: str = "denoiser"
    config: DiTConfig
    manifest: Manifest
    max_batch: int | None = None
    path: Path | None = None

    supports_cache: bool = False  # feature reuse: backends that set it implement _run_full / _run_light

    def __call__(self, x: Any, t: Any, y: Any) -> np.ndarray:
        x, t, y = prepare_denoiser_inputs(x, t, y, self.config)
        return chunked(self._run, (x, t, y), self.max_batch)

    def forward_full(self, x: Any, t: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Output and feature cache ``(N, 2*depth, T, D)`` float32 (see ``ditdeploy.feature_cache``)."""
        x, t, y = prepare_denoiser_inputs(x, t, y, self.config)
        return self._run_full(x, t, y)

    def forward_light(self, x: Any, t: Any, y: Any, cache: np.ndarray) -> np.ndarray:
        """Output of a light step from ``cache`` (rows matching x)."""
        x, t, y = prepare_denoiser_inputs(x, t, y, self.config)
        cache = np.ascontiguousarray(cache, dtype=np.float32)
        if cache.shape[0] != x.shape[0] or cache.shape[1:] != cache_shape(self.config):
            raise DitDeployError(
                f"feature cache has shape {cache.shape}, expected ({x.shape[0]}, "
                f"{', '.join(map(str, cache_shape(self.config)))})"
            )
        return self._run_light(x, t, y, cache)

    def _run_full(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise DitDeployError(f"{self.name} has no feature cache: use the torch backend or a --cache-graphs export")

    def _run_light(self, x: np.ndarray, t: np.ndarray, y: np.ndarray, cache: np.ndarray) -> np.ndarray:
        raise DitDeployError(f"{self.name} has no feature cache: use the torch backend or a --cache-graphs export")

    def _run(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release runtime resources (sessions, device buffers)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.config.variant} max_batch={self.max_batch}>"


class DecoderBase:
    """Common behaviour of VAE decoders: ``(latents (N, 4, h, w) float32) -> images (N, 3, 8h, 8w) in [-1, 1]``."""

    name: str = "decoder"
    manifest: Manifest
    max_batch: int | None = None
    latent_channels: int = LATENT_CHANNELS
    path: Path | None = None

    def __call__(self, latents: Any) -> np.ndarray:
        z = np.ascontiguousarray(latents, dtype=np.float32)
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise DitDeployError(
                f"decoder input must be (N, {self.latent_channels}, h, w) latents, got shape {z.shape}"
            )
        return chunked(self._run, (z,), self.max_batch)

    def _run(self, z: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release runtime resources."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


# The one timing/counting wrapper (also watches for NaN/Inf when asked): ``Timed(den)`` is ``Watched(den)``.
Timed = Watched
