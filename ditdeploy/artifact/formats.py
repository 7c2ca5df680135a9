"""The export-format registry: name -> artifact suffix, sidecar files, builder.

Every format list derives from it: ``ditdeploy export --fmt`` (choices, help, checks), the export pipeline's
dispatch and default file names, and the output policy's "files an artifact consists of"
(``outputs.artifact_files``) read :data:`FORMATS`. Adding a format is one builder module plus one
:func:`register_format` line at the bottom of this file (a test or plugin may call :func:`register_format`
itself)::

    def build(job: ExportJob) -> dict: ...   # writes job.out (+ its manifest), returns the manifest
    register_format(FormatSpec("myfmt", ".my", "mypkg.myfmt:build"))

Stdlib only: this is part of the artifact layer (it imports nothing above it); builders are named by
``"module:function"`` and imported when used (or given as a callable).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditdeploy.errors import DitDeployError

__all__ = ["FORMATS", "FormatSpec", "canonical_format", "format_names", "get_format", "register_format",
           "sidecar_files"]

FLOAT_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class FormatSpec:
    """One export format.

    ``suffix``: the artifact's suffix (``""``: a folder); ``builder``: ``"module:function"`` or a callable
    ``build(job) -> manifest`` (``job``: ``ditdeploy.export.pipeline.ExportJob``); ``aliases``: other accepted
    names; ``sidecars``: files beside the artifact, ``"+.data"`` appended to its name or ``".bin"`` replacing its
    suffix; ``decoder``: the format a VAE decoder exported with it takes (None: no ``--vae``); ``precisions``: the
    ``--precision`` values it builds; ``options``: its own export options (``ExportJob.options`` keys).
    """

    name: str
    suffix: str
    builder: str | Callable[..., Any]
    aliases: tuple[str, ...] = ()
    sidecars: tuple[str, ...] = ()
    decoder: str | None = None
    precisions: tuple[str, ...] = FLOAT_PRECISIONS
    options: tuple[str, ...] = ()
    help: str = ""

    def build(self, job: Any) -> dict[str, Any]:
        """Run the builder on ``job``."""
        fn = self.builder
        if isinstance(fn, str):
            module, _, attr = fn.partition(":")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise DitDeployError(f"--fmt {self.name} is not available in this ditdeploy ({fn}: {e})") from e
        return fn(job)


FORMATS: dict[str, FormatSpec] = {}


def register_format(spec: FormatSpec) -> FormatSpec:
    """Add ``spec`` (name and aliases must be new); returns it."""
    taken = {n for s in FORMATS.values() for n in (s.name, *s.aliases)}
    clash = taken & {spec.name, *spec.aliases}
    if clash:
        raise ValueError(f"format name(s) {', '.join(sorted(clash))} already registered")
    FORMATS[spec.name] = spec
    return spec


def format_names(aliases: bool = True) -> tuple[str, ...]:
    """Format names in registration order, each followed by its aliases (the ``--fmt`` choices)."""
    return tuple(n for s in FORMATS.values() for n in ((s.name, *s.aliases) if aliases else (s.name,)))


def canonical_format(name: str) -> str:
    """A format name or alias -> the format's name; a one-line error for an unknown one."""
    for spec in FORMATS.values():
        if name == spec.name or name in spec.aliases:
            return spec.name
    raise DitDeployError(f"unknown format {name!r}: choose one of {', '.join(format_names(aliases=False))}")


def get_format(name: str) -> FormatSpec:
    return FORMATS[canonical_format(name)]


def sidecar_files(path: str | Path) -> list[Path]:
    """The sidecar files of the artifact ``path`` (by its suffix: every format with that suffix)."""
    p = Path(path)
    out: list[Path] = []
    for spec in FORMATS.values():
        if spec.suffix and p.suffix == spec.suffix:
            for s in spec.sidecars:
                f = p.with_name(p.name + s[1:]) if s.startswith("+") else p.with_suffix(s)
                if f not in out:
                    out.append(f)
    return out


_PIPELINE = "ditdeploy.export.pipeline"
register_format(FormatSpec("onnx", ".onnx", f"{_PIPELINE}:build_onnx", sidecars=("+.data",), decoder="onnx",
                           help="ONNX (ONNX Runtime; the source of the other formats)"))
register_format(FormatSpec("openvino", ".xml", f"{_PIPELINE}:build_openvino", sidecars=(".bin",),
                           decoder="openvino", help="OpenVINO IR (.xml + .bin)"))
register_format(FormatSpec("trt", ".plan", f"{_PIPELINE}:build_trt", aliases=("tensorrt",), decoder="onnx",
                           options=("min_batch", "opt_batch", "timing_cache", "opt_level", "dry_run"),
                           help="TensorRT engine"))
register_format(FormatSpec("aoti", ".pt2", f"{_PIPELINE}:build_aoti", precisions=("fp32", "fp16", "bf16", "fp8"),
                           options=("device", "min_batch", "calibration"), help="AOTInductor .pt2"))
register_format(FormatSpec("diffusers", "", f"{_PIPELINE}:build_diffusers", precisions=("fp32",),
                           help="a DiTPipeline snapshot folder"))
register_format(FormatSpec("triton", "", "ditdeploy.export.triton_repo:build", options=("instances",),
                           help="a Triton model repository folder"))
