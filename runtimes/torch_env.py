"""What the ``.pt2`` / CUDA-graph / FP8 code needs from the torch it runs on, checked before the work starts.

* :data:`APIS`: every torch API that ``export/aoti.py``, ``export/fp8.py``, ``runtimes/aoti.py``,
  ``runtimes/cuda_staging.py`` and ``experiments/gpu_engines.py`` call, with the keyword parameters (or positional
  arity) they pass and the minimum torch version this project supports for it. :func:`api_problems` checks them
  against the running torch: a missing attribute, parameter or an older release is one line naming the feature and
  its minimum. The GPU machine runs torch 2.11 (this machine 2.13): each signature below was read in the torch 2.11.0
  wheel's own sources (``torch/_inductor/__init__.py``, ``torch/_inductor/package/package.py``,
  ``aoti_package/model_package_loader.h``, ``torch/export/``, ``torch/cuda/graphs.py``, ``torch/cuda/streams.py``,
  ``torch/cuda/memory.py``, ``torch/amp/autocast_mode.py``, ``torch/backends/``, ``_VariableFunctions.pyi``)
  and in the installed 2.13; releases before 2.11 were not read, so 2.11 is the minimum for all of them.
* :func:`find_cuda_toolkit`: AOTInductor on CUDA compiles C++ against the CUDA toolkit (torch 2.11's
  ``cpp_builder`` asks ``cpp_extension.include_paths("cuda")`` for its headers and links ``-lcuda``); without one
  every compile fails with "CUDA_HOME environment variable is not set". Found the way ``torch.utils.cpp_extension``
  looks (``CUDA_HOME``/``CUDA_PATH``, the ``nvcc`` on ``PATH``, ``/usr/local/cuda``) and checked for ``cuda.h``.

``python -m ditdeploy.runtimes.torch_env`` prints both, one line each (``experiments/gpu_run.sh`` records it).
Imports torch only inside :func:`api_problems`.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_TORCH = "2.11"  # the oldest release whose sources were read against these calls (the GPU machine's)


@dataclass(frozen=True)
class Api:
    """One torch API: ``path`` below ``torch``; the keyword ``params`` the code passes, or the positional ``arity``
    of a pybind constructor (read from its docstring, which is all pybind exposes)."""

    feature: str
    path: str
    params: tuple[str, ...] = ()
    arity: int | None = None
    min_version: str = MIN_TORCH


APIS: tuple[Api, ...] = (
    Api(".pt2 export", "export.export", ("dynamic_shapes", "strict")),
    Api(".pt2 export", "export.Dim", ("min", "max")),
    Api(".pt2 export", "_inductor.aoti_compile_and_package", ("package_path",)),
    Api(".pt2 export", "_inductor.config.patch"),
    Api(".pt2 load", "_C._aoti.AOTIModelPackageLoader", arity=5),  # path, name, run_single_threaded, runners, device
    Api(".pt2 load", "_C._aoti.AOTIModelPackageLoader.load_metadata_from_package"),
    Api(".pt2 load", "_inductor.aoti_load_package", ("run_single_threaded", "device_index")),
    Api(".pt2 load", "backends.cpu.get_cpu_capability"),
    Api("CUDA graphs", "cuda.CUDAGraph"),
    Api("CUDA graphs", "cuda.graph", ("stream",)),
    Api("CUDA graphs", "cuda.Stream"),
    Api("FP8", "float8_e4m3fn"),
    Api("FP8", "ops.aten._scaled_mm.default", ("scale_a", "scale_b", "out_dtype")),
    Api("torch.compile", "compile", ("mode", "dynamic")),
    # the GPU scripts' timing, precision and memory calls (experiments/gpu_torch.py, gpu_engines.py)
    Api("GPU bench", "cuda.Event", ("enable_timing",)),
    Api("GPU bench", "autocast", ("device_type", "dtype")),
    Api("GPU bench", "inference_mode"),
    Api("GPU bench", "cuda.synchronize"),
    Api("GPU bench", "cuda.current_stream"),
    Api("GPU bench", "cuda.stream"),
    Api("GPU bench", "cuda.empty_cache"),
    Api("GPU bench", "cuda.max_memory_allocated"),
    Api("GPU bench", "cuda.memory_allocated"),
    Api("GPU bench", "cuda.reset_peak_memory_stats"),
    Api("GPU bench", "cuda.get_device_capability"),
    Api("GPU bench", "cuda.get_device_name"),
    Api("GPU bench", "backends.cuda.matmul.allow_tf32"),
    Api("GPU bench", "backends.cudnn.allow_tf32"),
)


def release(version: str) -> tuple[int, ...]:
    """``2.11.0+cu130`` -> (2, 11, 0)."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def _params(obj: Any) -> set[str] | None:
    """Parameter names of a Python callable or an aten op overload; None when neither exposes them."""
    schema = getattr(obj, "_schema", None)
    if schema is not None:
        return {a.name for a in schema.arguments}
    try:
        return set(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return None


def _arity(cls: Any) -> int | None:
    """Positional arguments of a pybind ``__init__`` from its docstring (``arg0: str, arg1: ...``), self excluded."""
    doc = getattr(getattr(cls, "__init__", None), "__doc__", None) or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    return len(re.findall(r"\barg\d+\s*:", first)) or None


def _resolve(torch: Any, path: str) -> Any:
    obj = torch
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def api_problems(torch: Any = None, apis: tuple[Api, ...] = APIS, version: str | None = None) -> list[str]:
    """One line per API that the running torch (or ``version``) lacks; empty when everything is there."""
    if torch is None:
        import torch
    have = version or torch.__version__
    out = []
    for api in apis:
        what = f"{api.feature} needs torch >= {api.min_version} (torch.{api.path}"
        if release(have) < release(api.min_version):
            out.append(f"{what}); this is torch {have}")
            continue
        try:
            obj = _resolve(torch, api.path)
        except AttributeError:
            out.append(f"{what} is missing in torch {have})")
            continue
        if api.params:
            names = _params(obj)
            missing = [p for p in api.params if names is not None and p not in names]
            if missing:
                out.append(f"{what} has no parameter {', '.join(missing)} in torch {have})")
        if api.arity is not None and _arity(obj) not in (None, api.arity):
            out.append(f"{what} takes {_arity(obj)} arguments in torch {have}, the code passes {api.arity})")
    return out


def find_cuda_toolkit(environ: Mapping[str, str] | None = None,
                      default_home: str = "/usr/local/cuda") -> tuple[Path | None, str]:
    """(toolkit root or None, one line saying where it was found or why none is usable)."""
    env = os.environ if environ is None else environ
    home, how = env.get("CUDA_HOME") or env.get("CUDA_PATH"), "CUDA_HOME/CUDA_PATH"
    if not home:
        nvcc = shutil.which("nvcc", path=env.get("PATH", ""))
        if nvcc:
            home, how = str(Path(nvcc).resolve().parent.parent), "nvcc on PATH"
        elif Path(default_home).is_dir():
            home, how = default_home, default_home
    if not home:
        return None, (f"no CUDA toolkit: CUDA_HOME and CUDA_PATH unset, no nvcc on PATH, no {default_home}; "
                      "AOTInductor on CUDA compiles against its headers (cuda.h) and libcuda: install the toolkit "
                      "or set CUDA_HOME")
    include = [Path(home) / "include"] + ([Path(env["CUDA_INC_PATH"])] if env.get("CUDA_INC_PATH") else [])
    if not any((d / "cuda.h").is_file() for d in include):
        return None, (f"the CUDA toolkit at {home} (from {how}) has no include/cuda.h: AOTInductor on CUDA "
                      "compiles against it; install the toolkit's headers or point CUDA_HOME at a full toolkit")
    return Path(home), f"CUDA toolkit: {home} (from {how}), cuda.h found"


def main() -> None:
    """Print the torch API check and the CUDA toolkit line (``experiments/gpu_run.sh`` records them)."""
    import torch

    problems = api_problems(torch)
    print(f"torch {torch.__version__}: " + ("; ".join(problems) if problems else
                                             f"all {len(APIS)} torch APIs of the .pt2/CUDA-graph/FP8/GPU-bench code present (minimum {MIN_TORCH})"))
    print(find_cuda_toolkit()[1])


if __name__ == "__main__":
    main()
