"""Run an exported DiT denoiser (and VAE decoder) on torch, ONNX Runtime, OpenVINO, TensorRT or AOTInductor.

This is ``ditdeploy.runtimes``; AOTInductor artifacts are ``.pt2`` packages. One protocol for all backends::

    from ditdeploy.runtimes import load, load_decoder
    den = load("s2.onnx")                      # backend from the suffix, or load(p, backend="openvino")
    out = den(x, t, y)                         # x float32 (N,C,H,W), t/y int64 (N,) -> (N, out_C, H, W)
    den.name, den.config, den.manifest         # "onnxruntime:CPUExecutionProvider:fp32", DiTConfig, dict
    dec = load_decoder("vae.onnx")             # (N,4,h,w) raw latents -> (N,3,8h,8w) images in [-1, 1]

Backends are imported lazily: importing this package pulls no runtime and never torch (only the ``torch`` and
``aoti`` backends import torch, when selected).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ditdeploy.artifact.manifest import Manifest
from ditdeploy.config.variants import DiTConfig
from ditdeploy.errors import ArtifactError, DitDeployError
from ditdeploy.runtimes.base import Timed
from ditdeploy.runtimes.options import accepted, validate
from ditdeploy.runtimes.registry import backend_module, backend_names, canonical, get_backend, suffix_backends

__all__ = ["Decoder", "Denoiser", "Timed", "backend_names", "check_options", "load", "load_decoder",
           "options_for", "resolve_backend", "select_options"]

# The backends, their aliases and suffixes are declared by each runtime module (``BACKEND``) and collected by
# ``ditdeploy.runtimes.registry``; nothing here lists them.


@runtime_checkable
class Denoiser(Protocol):
    """``denoiser(x, t, y) -> np.ndarray``: x float32 (N,C,H,W), t int64 original timesteps, y int64 labels."""

    name: str
    config: DiTConfig
    manifest: Manifest

    def __call__(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class Decoder(Protocol):
    """``decoder(latents) -> images``: raw latents (N,4,h,w) float32 -> (N,3,8h,8w) float32 in [-1, 1]."""

    name: str
    manifest: Manifest

    def __call__(self, latents: np.ndarray) -> np.ndarray: ...


def resolve_backend(path: str | os.PathLike, backend: str | None = None) -> str:
    """The backend for ``path``: ``backend`` (a name or alias) if given, checked against what it can read, else the
    one that claims the suffix. A diffusers DiT snapshot folder is read by the torch backend (the mapped reference
    model)."""
    if _is_snapshot(path):
        if backend and canonical(backend) != "torch":
            raise DitDeployError(f"{Path(path).name}/ is a diffusers snapshot: only the torch backend reads it "
                                 f"(export it first: ditdeploy export --checkpoint {path})")
        return "torch"
    suffix = Path(path).suffix.lower()
    if backend:
        spec = get_backend(backend)
        if suffix not in spec.reads:
            raise DitDeployError(
                f"the {spec.name} backend cannot read {suffix or 'suffix-less'} files ({Path(path).name}); "
                f"it reads {', '.join(spec.reads)}"
            )
        return spec.name
    claimed = suffix_backends()
    if suffix not in claimed:
        raise DitDeployError(
            f"cannot tell the backend for {Path(path).name}: use a known suffix "
            f"({', '.join(claimed)}) or pass --backend"
        )
    return claimed[suffix]


def _module(backend: str):
    return backend_module(backend)


def _is_snapshot(path: str | os.PathLike) -> bool:
    from ditdeploy.artifact.files import is_snapshot_dir

    return is_snapshot_dir(path)


def _check_exists(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"no such file: {p}")
    if p.is_dir() and not _is_snapshot(p):
        raise ArtifactError(f"{p} is a directory, expected a model file")
    return p


def load(path: str | os.PathLike, backend: str | None = None, **opts: Any) -> Denoiser:
    """Load a denoiser artifact on a backend (by suffix or name); verifies its manifest and input shapes.

    ``opts`` go to the backend: e.g. ``threads``, ``providers`` (onnxruntime), ``precision_hint`` /
    ``performance_hint`` (openvino), ``cuda_graph`` (tensorrt, aoti, torch), ``image_size`` (torch, for bare .pt files),
    ``verify`` (sha256 check, default True). Each backend takes a fixed, typed set (:func:`options_for`); an
    unknown or misspelt option, or a value of the wrong type, is a one-line DitDeployError naming the valid ones,
    raised before anything loads.
    """
    p = _check_exists(path)
    b = resolve_backend(p, backend)
    entry = _module(b).load_denoiser
    validate(b, "denoiser", entry, opts)
    return entry(p, **opts)


def load_decoder(path: str | os.PathLike, backend: str | None = None, **opts: Any) -> Decoder:
    """Load a VAE decoder artifact (``kind: decoder``) on a backend chosen like :func:`load`.

    A directory is a diffusers ``AutoencoderKL`` folder, run by the torch backend (the reference decoder).
    """
    p = Path(path)
    if p.is_dir():
        if backend and canonical(backend) != "torch":
            raise DitDeployError(f"{p} is a diffusers VAE folder: only the torch backend reads it")
        validate("torch", "decoder", _module("torch").load_decoder, opts)
        return _module("torch").load_decoder(p, **opts)
    p = _check_exists(path)
    b = resolve_backend(p, backend)
    mod = _module(b)
    if not hasattr(mod, "load_decoder"):
        raise DitDeployError(f"the {b} backend has no VAE decoder support; export the decoder to ONNX")
    validate(b, "decoder", mod.load_decoder, opts)
    return mod.load_decoder(p, **opts)


def options_for(backend: str, kind: str = "denoiser") -> tuple[str, ...]:
    """The options ``backend`` takes for a ``denoiser`` or ``decoder`` (``()`` when it has no decoder support).

    They are the keyword parameters of the backend's entry point (``runtimes/options.py``)."""
    b = canonical(backend)
    entry = getattr(_module(b), f"load_{kind}", None)
    return accepted(entry) if entry is not None else ()


def select_options(backend: str, options: dict[str, Any], kind: str = "denoiser", *, strict: bool = True,
                   flags: dict[str, str] | None = None, only: dict[str, tuple[str, ...]] | None = None,
                   ignored: tuple[str, ...] = ()) -> dict[str, Any]:
    """The one filter of backend options: the entries of ``options`` that ``backend``'s ``kind`` takes (values
    None/False dropped: "not set").

    ``only``: option -> the backends where it means what the caller means (``device`` is a torch device for the
    torch/aoti backends, something else for OpenVINO's). An option ``backend`` does not take is, with ``strict``,
    a one-line error naming its flag (``flags``: option -> flag) and the backends that do take it; without it (or
    for the ``ignored`` options, which only some backends need) the option is left out (a decoder gets the
    denoiser's options it also takes).
    """
    b = canonical(backend)
    only, flags = only or {}, flags or {}
    out = {}
    for k, v in options.items():
        if v is None or v is False:
            continue
        allowed = list(only.get(k) or (n for n in backend_names() if k in options_for(n, kind)))
        if b in allowed and k in options_for(b, kind):
            out[k] = v
        elif strict and k not in ignored:
            raise DitDeployError(f"{flags.get(k, k)} applies to the {', '.join(allowed)} backend"
                                 f"{'s' * (len(allowed) > 1)} only"
                                 + (" (bare .pt checkpoints)" if k == "image_size" else "") + f", not {b}")
    return out


def check_options(backend: str, opts: dict[str, Any], kind: str = "denoiser") -> None:
    """One-line DitDeployError when ``opts`` holds an option the ``backend``'s ``kind`` does not take."""
    b = canonical(backend)
    validate(b, kind, getattr(_module(b), f"load_{kind}"), opts)
