"""TensorRT backend: a serialized engine (.plan / .engine) run through Polygraphy's TensorRT runner.

The engine is deserialized by Polygraphy's ``EngineFromBytes`` and run by its ``TrtRunner`` (named I/O tensors,
``set_input_shape``, ``execute_async_v3`` with its result checked): the code NVIDIA tests. With
``cuda_graph=True`` a CUDA graph is captured per batch size instead (``TrtRunner`` has no graph mode; see
``trt_cuda``: every launch checked, graphs destroyed, CUDA errors by name). Batches above the optimisation
profile's maximum are chunked; a batch below its minimum is padded (repeated last row) and sliced back.

Engines are tied to the TensorRT version and the GPU they were built on: before deserializing, the manifest's
recorded TensorRT version and GPU (name, compute capability) are compared with the running ones and a mismatch is
a one-line ArtifactError.

Not exercised on this project's CI (no GPU); the pure-python parts (manifest checks, profile range, padding,
chunking, CUDA error naming) are tested on CPU.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.artifact.manifest import Manifest
from ditdeploy.errors import ArtifactError, DitDeployError, require
from ditdeploy.runtimes.base import (
    DENOISER_INPUTS,
    DENOISER_OUTPUT,
    DenoiserBase,
    check_dims,
    denoiser_shapes,
    read_manifest,
)
from ditdeploy.runtimes.registry import BackendSpec
from ditdeploy.runtimes.trt_cuda import CudaGraphExecutor, ck, cudart

BACKEND = BackendSpec("tensorrt", reads=(".plan", ".engine", ".trt"), claims=(".plan", ".engine", ".trt"),
                      aliases=("trt",), distributions=("tensorrt",), imports="tensorrt")

# --------------------------------------------------------------------------------------------- pure python parts


def _version_tuple(v: str | None, n: int = 3) -> tuple[int, ...] | None:
    if not v:
        return None
    nums = [int(x) for x in re.findall(r"\d+", str(v))[:n]]
    return tuple(nums) if nums else None


def _cc_tuple(cc: Any) -> tuple[int, int] | None:
    if cc is None:
        return None
    if isinstance(cc, (list, tuple)) and len(cc) >= 2:
        return int(cc[0]), int(cc[1])
    m = re.match(r"^\s*(?:sm_?)?(\d+)[._]?(\d)?\s*$", str(cc))
    if not m:
        return None
    if m.group(2) is None:  # "89" / "sm_89"
        s = m.group(1)
        return int(s[:-1]), int(s[-1])
    return int(m.group(1)), int(m.group(2))


def engine_build_info(m: dict[str, Any]) -> dict[str, Any]:
    """What the manifest says the engine was built with: ``trt_version``, ``gpu_name``, ``compute_capability``.

    Accepts a ``tensorrt`` table (``version``, ``gpu`` / ``gpu_name``, ``compute_capability``, optional
    ``version_compatible`` / ``hardware_compatibility_level``), a top-level ``gpu`` table, and falls back to
    ``tools.tensorrt`` for the version.
    """
    m = Manifest.of(m)
    trt, gpu = m.section("tensorrt"), m.section("gpu")
    tgpu = trt.get("gpu") if isinstance(trt.get("gpu"), dict) else {}
    name = (trt.get("gpu_name") or (trt.get("gpu") if isinstance(trt.get("gpu"), str) else None)
            or tgpu.get("name") or gpu.get("name") or (m.get("gpu") if isinstance(m.get("gpu"), str) else None))
    cc = (trt.get("compute_capability") or tgpu.get("compute_capability") or gpu.get("compute_capability")
          or m.get("compute_capability"))
    version = trt.get("version") or trt.get("trt_version") or m.section("tools").get("tensorrt")
    hw = str(trt.get("hardware_compatibility_level") or "none").lower()
    return {
        "trt_version": version,
        "gpu_name": name,
        "compute_capability": _cc_tuple(cc),
        "version_compatible": bool(trt.get("version_compatible", False)),
        "hardware_compatible": hw not in ("none", "", "0", "false"),
    }


def check_engine_compat(m: dict[str, Any], trt_version: str, gpu_name: str | None,
                        compute_capability: tuple[int, int] | None, strict_gpu_name: bool = True) -> None:
    """Raise ArtifactError when the engine's recorded TensorRT version or GPU differs from the running ones.

    TensorRT version: major.minor.patch must match (unless built version-compatible, then only the major).
    GPU: compute capability must match (unless built hardware-compatible); with ``strict_gpu_name`` the device
    name must match too (same-SM engines run on other SKUs, but tactics were timed on the recorded one).
    """
    info = engine_build_info(m)
    built = _version_tuple(info["trt_version"])
    running = _version_tuple(trt_version)
    if built is None:
        raise ArtifactError("the engine's manifest does not record the TensorRT version it was built with: rebuild it")
    if running is not None:
        n = 1 if info["version_compatible"] else 3
        if built[:n] != running[:n]:
            raise ArtifactError(
                f"engine built with TensorRT {'.'.join(map(str, built))}, running TensorRT "
                f"{'.'.join(map(str, running))}: engines are not portable across versions; rebuild it here "
                "(`ditdeploy export --fmt trt`)"
            )
    if info["hardware_compatible"]:
        return
    cc_b, cc_r = info["compute_capability"], compute_capability
    if cc_b is not None and cc_r is not None and tuple(cc_b) != tuple(cc_r):
        raise ArtifactError(
            f"engine built for compute capability {cc_b[0]}.{cc_b[1]} ({info['gpu_name'] or '?'}), this GPU is "
            f"{cc_r[0]}.{cc_r[1]} ({gpu_name or '?'}): rebuild the engine on this GPU"
        )
    if strict_gpu_name and info["gpu_name"] and gpu_name and _norm(info["gpu_name"]) != _norm(gpu_name):
        raise ArtifactError(
            f"engine built on {info['gpu_name']}, running on {gpu_name}: rebuild it here, or pass "
            "strict_gpu_name=False to run it anyway (same compute capability)"
        )


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", str(s)).strip().lower()


def profile_batch_range(profile_shapes: Any) -> tuple[int, int]:
    """(min, max) batch from ``get_tensor_profile_shape`` output ``(min, opt, max)`` shapes of ``x``."""
    try:
        lo, hi = int(profile_shapes[0][0]), int(profile_shapes[2][0])
    except (IndexError, TypeError, ValueError) as e:
        raise ArtifactError(f"cannot read the engine's optimisation profile: {profile_shapes!r}") from e
    if not 1 <= lo <= hi:
        raise ArtifactError(f"the engine's optimisation profile has batch {lo}..{hi}: rebuild it")
    return lo, hi


def pad_batch(arrays: tuple[np.ndarray, ...], n_min: int) -> tuple[tuple[np.ndarray, ...], int]:
    """Pad a batch below the engine profile's minimum up to ``n_min`` rows by repeating its last row (DiT rows are
    independent, so the first ``n`` output rows are unchanged); returns the arrays and the real row count."""
    n = int(arrays[0].shape[0])
    if n == 0:
        raise DitDeployError("empty batch")
    if n >= n_min:
        return arrays, n
    return tuple(np.concatenate([a, np.repeat(a[-1:], n_min - n, axis=0)]) for a in arrays), n


def gpu_info(device: int = 0) -> tuple[str, tuple[int, int]]:
    """Name and compute capability of CUDA device ``device``."""
    rt = cudart()
    props = ck(rt, rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00").strip(), (int(props.major), int(props.minor))


# --------------------------------------------------------------------------------------------- the runtime


class TensorRTDenoiser(DenoiserBase):
    """A denoiser engine run by Polygraphy's ``TrtRunner`` (or, with ``cuda_graph=True``, by CUDA graphs).

    Batches above the profile's max are chunked (``DenoiserBase``); a batch below its min is padded (repeated last
    row, output sliced back), so every call is within the profile.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True, device: int = 0, cuda_graph: bool = False,
                 strict_gpu_name: bool = True, max_batch: int | None = None, trust_native_code: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, "denoiser", verify=verify)
        self.config = self.manifest.config
        from ditdeploy.artifact.trust import require_trusted

        require_trusted(self.path, "tensorrt", trust_native_code, self.manifest if verify else None)  # before TensorRT
        self.trt = trt = require("tensorrt", "tensorrt", "the TensorRT backend")
        ptrt = require("polygraphy.backend.trt", "tensorrt", "the TensorRT backend")
        rt = cudart()
        ck(rt, rt.cudaSetDevice(device), "cudaSetDevice")
        name, cc = gpu_info(device)
        check_engine_compat(self.manifest, trt.__version__, name, cc, strict_gpu_name=strict_gpu_name)
        self.engine = _deserialize(ptrt, self.path)
        self.output_name, names = self._check_io()
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.min_batch, engine_max = profile_batch_range(self.engine.get_tensor_profile_shape("x", 0))
        limits = [b for b in (engine_max, self.manifest.max_batch, max_batch) if b]
        self.max_batch = min(limits)
        if self.max_batch < self.min_batch:
            raise DitDeployError(f"max batch {self.max_batch} is below the engine profile's minimum batch "
                                 f"{self.min_batch}")
        self.name = f"tensorrt:{name}:{self.manifest.precision}"
        self.use_graph = bool(cuda_graph)
        self._runner = self._graph = None
        if self.use_graph:
            self._graph = CudaGraphExecutor(self.engine, names, {n: self._row_bytes(n) for n in names},
                                            self.max_batch)
        else:
            self._runner = ptrt.TrtRunner(self.engine)
            self._runner.activate()

    def _check_io(self) -> tuple[str, list[str]]:
        trt, eng = self.trt, self.engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(inputs) != sorted(DENOISER_INPUTS) or len(outputs) != 1:
            raise ArtifactError(f"{self.path.name} has inputs {inputs} / outputs {outputs}, expected x, t, y -> out")
        out_name = DENOISER_OUTPUT if DENOISER_OUTPUT in outputs else outputs[0]
        shapes = denoiser_shapes(self.config)
        for n in [*DENOISER_INPUTS, out_name]:
            check_dims(n, list(eng.get_tensor_shape(n)), shapes.get(n, shapes["out"]), self.path)
        return out_name, names

    def _row_bytes(self, name: str) -> int:
        c = self.config
        ch = c.out_channels if name == self.output_name else (c.in_channels if name == "x" else 0)
        return (ch * c.input_size * c.input_size if ch else 1) * self.dtypes[name].itemsize

    def _run(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        if x.shape[0] > self.max_batch:  # DenoiserBase chunks first; a direct caller gets the real limits
            raise DitDeployError(f"batch {x.shape[0]} is outside the engine profile's batch range "
                                 f"{self.min_batch}..{self.max_batch}")
        (x, t, y), n = pad_batch((x, t, y), self.min_batch)
        feed = {k: np.ascontiguousarray(a, dtype=self.dtypes[k]) for k, a in (("x", x), ("t", t), ("y", y))}
        if self._graph is not None:
            c = self.config
            out = np.empty((x.shape[0], c.out_channels, c.input_size, c.input_size),
                           dtype=self.dtypes[self.output_name])
            out = self._graph.run(feed, out, self.output_name)
        else:
            out = self._runner.infer(feed)[self.output_name]
        return np.array(out[:n], dtype=np.float32)  # a copy: TrtRunner reuses its host output buffers

    def close(self) -> None:
        if getattr(self, "_graph", None) is not None:
            self._graph.close()
        if getattr(self, "_runner", None) is not None:
            self._runner.deactivate()
        self._graph = self._runner = self.engine = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def _deserialize(ptrt: Any, path: Path) -> Any:
    """Polygraphy's ``EngineFromBytes`` (it checks for a None engine); its error as one line."""
    from polygraphy.exception import PolygraphyException

    try:
        return ptrt.EngineFromBytes(path.read_bytes())()
    except PolygraphyException as e:
        raise ArtifactError(f"TensorRT could not deserialize {path.name}: {' '.join(str(e).split())[:300]}") from e


# the backend entry point used by ditdeploy.runtimes.load: its signature is the option set
load_denoiser = TensorRTDenoiser
