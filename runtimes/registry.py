"""The backend registry: each runtime module declares a :class:`BackendSpec`; backend lists derive from it.

A runtime module (``runtimes/onnxruntime.py``...) holds ``BACKEND = BackendSpec(...)`` (its name, aliases, the
suffixes it reads and those it is the default for, the pip distributions whose versions matter, bench's
default targets) next to ``load_denoiser`` / ``load_decoder``, whose keyword parameters are its option set
(``runtimes/options.py``). :data:`MODULES` below lists the runtime modules: adding a backend is one module
plus one line there (a test or plugin may call :func:`register_backend` with its own module instead).

Every backend list reads this registry: ``runtimes.load`` (suffix -> backend, aliases, what a backend reads),
the CLI's ``--backend`` choices, ``ditdeploy info``, ``bench``'s default targets (:func:`readers`) and
:func:`tool_versions`. Modules are imported on first use; none imports its runtime library (or torch) at
import time.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as md
import importlib.util
import platform
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ditdeploy.errors import DitDeployError

__all__ = ["MODULES", "BackendSpec", "backend_module", "backend_names", "backends",
           "canonical", "get_backend", "readers", "register_backend", "suffix_backends", "tool_versions"]

# the runtime modules, one line per backend (the order of the CLI choices and of `ditdeploy info`)
MODULES = (
    "ditdeploy.runtimes.aoti",
    "ditdeploy.runtimes.onnxruntime",
    "ditdeploy.runtimes.openvino",
    "ditdeploy.runtimes.tensorrt",
    "ditdeploy.runtimes.torch",
)
# libraries that matter for reproducing an artifact besides the backends' own
CORE_DISTRIBUTIONS = ("ditdeploy", "onnx", "onnxscript", "numpy")


@dataclass(frozen=True)
class BackendSpec:
    """What a runtime module declares about itself.

    ``reads``: suffixes it can load; ``claims``: those it is chosen for when no backend is named (a suffix is
    claimed by one backend); ``distributions``: pip distributions whose versions are recorded/shown (the first
    importable ``imports`` module means "installed").
    """

    name: str
    reads: tuple[str, ...]
    claims: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    distributions: tuple[str, ...] = ()
    imports: str | None = None
    module: str = field(default="", compare=False)

    def installed(self) -> bool:
        """Whether its runtime library can be imported here (a probe: nothing is imported)."""
        return self.imports is None or importlib.util.find_spec(self.imports) is not None

    def versions(self) -> dict[str, str]:
        """Installed versions of its distributions (absent ones left out)."""
        return _versions(self.distributions)


_REGISTRY: dict[str, BackendSpec] = {}
_loaded = False


def register_backend(spec: BackendSpec, module: str | ModuleType) -> BackendSpec:
    """Register ``spec`` whose ``load_denoiser`` (and optional ``load_decoder``) live in ``module``."""
    name = module if isinstance(module, str) else module.__name__
    _load()
    if spec.name in _REGISTRY:
        raise ValueError(f"backend {spec.name!r} is already registered")
    spec = BackendSpec(**{**spec.__dict__, "module": name})
    _REGISTRY[spec.name] = spec
    return spec


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in MODULES:
        spec = importlib.import_module(name).BACKEND
        _REGISTRY[spec.name] = BackendSpec(**{**spec.__dict__, "module": name})


def backends() -> dict[str, BackendSpec]:
    """Name -> spec of every registered backend."""
    _load()
    return dict(_REGISTRY)


def backend_names() -> tuple[str, ...]:
    return tuple(backends())


def canonical(name: str) -> str:
    """A backend name or alias (any case) -> the backend's name; a one-line error for an unknown one."""
    low = name.lower()
    for spec in backends().values():
        if low == spec.name or low in spec.aliases:
            return spec.name
    raise DitDeployError(f"unknown backend {name!r}: choose one of {', '.join(backend_names())}")


def get_backend(name: str) -> BackendSpec:
    return backends()[canonical(name)]


def backend_module(name: str) -> Any:
    """The runtime module of backend ``name`` (imported now)."""
    return importlib.import_module(get_backend(name).module)


def suffix_backends() -> dict[str, str]:
    """Suffix -> the backend chosen for it when none is named."""
    return {s: spec.name for spec in backends().values() for s in spec.claims}


def readers(suffix: str) -> list[str]:
    """Backends that can read ``suffix``, the one that claims it first."""
    first = suffix_backends().get(suffix.lower())
    rest = [s.name for s in backends().values() if suffix.lower() in s.reads and s.name != first]
    return ([first] if first else []) + rest


def _versions(dists: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for dist in dists:
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


def tool_versions() -> dict[str, str]:
    """Versions of the libraries that matter for reproducing an artifact: Python, the core ones and every
    backend's distributions (only those installed)."""
    dists = list(CORE_DISTRIBUTIONS)
    for spec in backends().values():
        dists += [d for d in spec.distributions if d not in dists]
    return {"python": platform.python_version(), **_versions(tuple(dists))}
