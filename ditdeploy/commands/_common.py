"""The CLI vocabulary shared by every command (README "CLI conventions" documents it).

One definition of each common option, its choices and ranges, the progress default and the deprecation line
for old spellings.

Typer + stdlib only at import time. The ``--sampler``, ``--backend`` and ``--fmt`` choices are read from their
registries (``ditdeploy.diffusion.registry``, ``ditdeploy.runtimes.registry``, ``ditdeploy.artifact.formats``)
when the parser needs them, so a registered sampler/backend/format appears in every command's choices and
--help.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer

# rich help panels: long option lists are grouped so --help stays readable at 80 columns
PANEL_MODEL = "Model and backend"
PANEL_SAMPLING = "Sampling"
PANEL_OUTPUT = "Output"
PANEL_CHECK = "Thresholds"
PANEL_BUILD = "Build"


def sampler_names() -> tuple[str, ...]:
    from ditdeploy.diffusion.registry import sampler_names as names

    return names()


def backend_names() -> tuple[str, ...]:
    from ditdeploy.runtimes.registry import backend_names as names

    return names()


def format_names() -> tuple[str, ...]:
    from ditdeploy.artifact.formats import format_names as names

    return names()


_REGISTRY_ENUMS = {"Sampler": sampler_names, "Backend": backend_names, "Fmt": format_names}


def __getattr__(name: str) -> Any:
    """``Sampler`` / ``Backend`` / ``Fmt``: a str Enum of the registry's names, built when typer reads a command's
    annotations (so a registered sampler, backend or format appears in the choices and --help)."""
    names = _REGISTRY_ENUMS.get(name)
    if names is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return Enum(name, {n: n for n in names()}, type=str)


class PrecisionHint(str, Enum):
    """OpenVINO ``INFERENCE_PRECISION_HINT`` values."""

    f32 = "f32"
    bf16 = "bf16"
    f16 = "f16"
    default = "default"


def value(v: Any) -> Any:
    """An Enum member's value (typer hands enum members to the command); anything else unchanged."""
    return v.value if isinstance(v, Enum) else v


# ------------------------------------------------------------------------------------------------ option factories
def engine_option(help: str = "Artifact (.onnx, .xml, .plan/.engine, .safetensors/.pt). Default: the shipped "
                                "digits model.") -> Any:
    return typer.Option(None, "--engine", "-e", help=help, rich_help_panel=PANEL_MODEL)


def backend_option() -> Any:
    return typer.Option(None, "--backend", "-b", help="Runtime (default: from the file suffix).",
                        case_sensitive=False, rich_help_panel=PANEL_MODEL)


def threads_option() -> Any:
    from ditdeploy.system.bounds import max_threads

    return typer.Option(None, "--threads", min=1, max=max_threads(), help="Intra-op threads (default: physical cores).",
                        rich_help_panel=PANEL_MODEL)


def provider_option() -> Any:
    return typer.Option(None, "--provider", help="ONNX Runtime providers, e.g. cpu or cuda,cpu.",
                        rich_help_panel=PANEL_MODEL)


def precision_hint_option() -> Any:
    return typer.Option(None, "--precision-hint", help="OpenVINO inference precision (default f32: parity).",
                        rich_help_panel=PANEL_MODEL)


def vae_option() -> Any:
    return typer.Option(None, "--vae", help="VAE decoder artifact for latent models (default: the manifest's "
                        "'decoder').", rich_help_panel=PANEL_MODEL)


def sampler_option(help: str = "Sampler.") -> Any:
    return typer.Option("ddim", "--sampler", help=help, rich_help_panel=PANEL_SAMPLING)


def steps_option(default: int, help: str = "Sampling steps (model evaluations).") -> Any:
    return typer.Option(default, "--steps", min=1, max=1000, help=help, rich_help_panel=PANEL_SAMPLING)


def seed_option(help: str = "Seed; image i's noise derives from (seed, i).") -> Any:
    return typer.Option(0, "--seed", min=0, help=help, rich_help_panel=PANEL_SAMPLING)


def cfg_interval_option(help: str) -> Any:
    """``--cfg-interval LO,HI`` (parsed and checked by the sampler: one spelling, one parser)."""
    return typer.Option(None, "--cfg-interval", help=help, rich_help_panel=PANEL_SAMPLING)


def cache_interval_option(help: str) -> Any:
    """``--cache-interval N`` (feature reuse; N is checked by the sampler against the artifact)."""
    return typer.Option(None, "--cache-interval", help=help, rich_help_panel=PANEL_SAMPLING)


def cuda_graph_option(help: str) -> Any:
    """``--cuda-graph`` (CUDA only; refused in one line on the CPU)."""
    return typer.Option(False, "--cuda-graph", help=help, rich_help_panel=PANEL_MODEL)


def trust_native_code_option() -> Any:
    """``--trust-native-code``: load a .pt2 / TensorRT engine that this installation did not build (``ditdeploy.artifact.trust``;
    like transformers' ``trust_remote_code``). Data formats (ONNX, OpenVINO IR, safetensors) ignore it."""
    return typer.Option(False, "--trust-native-code", help="Load a .pt2 or TensorRT engine (they run native code) "
                        "that this installation did not build and the trusted list does not name. Only for "
                        "artifacts from a source you trust.", rich_help_panel=PANEL_MODEL)


def progress_option() -> Any:
    return typer.Option(None, "--progress/--no-progress", help="Progress bars on stderr (default: on when stderr "
                        "is a terminal).", show_default=False)


def progress_on(flag: bool | None) -> bool:
    """``--progress/--no-progress``, else on only when stderr is a terminal; DITDEPLOY_NO_PROGRESS=1 turns it off."""
    if os.environ.get("DITDEPLOY_NO_PROGRESS") == "1":
        return False
    return bool(flag) if flag is not None else sys.stderr.isatty()


# ------------------------------------------------------------------------------------------------ deprecations
def deprecated(old_flag: str, new_flag: str, old: Any, new: Any, default: Any = None) -> Any:
    """The value of an option that has an old spelling: ``old`` (with one warning line on stderr) when given, else
    ``new``. Both given (``new`` not at its default): a one-line error."""
    from ditdeploy.errors import DitDeployError

    if old is None or old is False:
        return new
    if new is not None and new != default:
        raise DitDeployError(f"{old_flag} is the old spelling of {new_flag}: pass only {new_flag}")
    warn_deprecated(old_flag, new_flag)
    return old


def warn_deprecated(old: str, new: str) -> None:
    """One line on stderr: the old spelling still works for this release."""
    typer.echo(f"warning: {old} is deprecated and will be removed in the next release: use {new}", err=True)


def existing(path: Path | None, what: str = "file") -> Path | None:
    """``path`` when it exists (None passes), else a one-line error."""
    from ditdeploy.errors import DitDeployError

    if path is not None and not Path(path).exists():
        raise DitDeployError(f"no such {what}: {path}")
    return path
