"""TensorRT backend: a serialized engine (.plan / .engine) run through named I/O tensors.

Thin by design, following the TensorRT 10/11 Python API: ``Runtime.deserialize_cuda_engine``, tensors by name
(``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``, ``get_tensor_profile_shape``), per-call
``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3`` on a CUDA stream, device memory and copies via
cuda-python's runtime bindings. Batches larger than the engine's optimisation-profile maximum are chunked. An
optional CUDA graph is captured per batch size (``cuda_graph=True``).

Engines are tied to the TensorRT version and the GPU they were built on: before deserializing, the manifest's
recorded TensorRT version and GPU (name, compute capability) are compared with the running ones and a mismatch is
a one-line ArtifactError. TensorRT 10 vs 11 differences are handled by feature detection (e.g.
``device_memory_size_v2``; 11 removed weak typing, which only affects building, not this runtime).

Not exercised on this project's CI (no GPU); the pure-python parts (manifest checks, chunking, profile parsing)
are tested on CPU.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.errors import ArtifactError, DitDeployError, require
from ditdeploy.runtimes.base import (
    DENOISER_INPUTS,
    DENOISER_OUTPUT,
    DenoiserBase,
    check_dims,
    config_from_manifest,
    denoiser_shapes,
    max_batch_from_manifest,
    read_manifest,
)

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
    trt = m.get("tensorrt") if isinstance(m.get("tensorrt"), dict) else {}
    gpu = m.get("gpu") if isinstance(m.get("gpu"), dict) else {}
    tgpu = trt.get("gpu") if isinstance(trt.get("gpu"), dict) else {}
    name = (trt.get("gpu_name") or (trt.get("gpu") if isinstance(trt.get("gpu"), str) else None)
            or tgpu.get("name") or gpu.get("name") or (m.get("gpu") if isinstance(m.get("gpu"), str) else None))
    cc = (trt.get("compute_capability") or tgpu.get("compute_capability") or gpu.get("compute_capability")
          or m.get("compute_capability"))
    version = trt.get("version") or trt.get("trt_version") or (m.get("tools") or {}).get("tensorrt")
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


def profile_max_batch(profile_shapes: Any) -> int:
    """Max batch from ``get_tensor_profile_shape`` output ``(min, opt, max)`` shapes of ``x``."""
    try:
        mx = profile_shapes[2]
        return int(mx[0])
    except (IndexError, TypeError, ValueError) as e:
        raise ArtifactError(f"cannot read the engine's optimisation profile: {profile_shapes!r}") from e


# --------------------------------------------------------------------------------------------- CUDA helpers


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            from ditdeploy.errors import MissingDependencyError

            raise MissingDependencyError("cuda-python", "tensorrt", "the TensorRT backend") from e
    return cudart


def _ck(ret: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` return and raise on error."""
    if isinstance(ret, tuple):
        err, vals = ret[0], ret[1:]
    else:
        err, vals = ret, ()
    if int(getattr(err, "value", err)) != 0:  # cudaError_t.cudaSuccess == 0
        raise DitDeployError(f"CUDA error in {what}: {err}")
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else vals


def gpu_info(device: int = 0) -> tuple[str, tuple[int, int]]:
    """Name and compute capability of CUDA device ``device``."""
    cudart = _cudart()
    props = _ck(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00").strip(), (int(props.major), int(props.minor))


# --------------------------------------------------------------------------------------------- the runtime


class TensorRTDenoiser(DenoiserBase):
    """A denoiser engine executed with named tensors on one CUDA stream."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True, device: int = 0, cuda_graph: bool = False,
                 strict_gpu_name: bool = True, max_batch: int | None = None, **_: Any):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, "denoiser", verify=verify)
        self.config = config_from_manifest(self.manifest, self.path)
        trt = require("tensorrt", "tensorrt", "the TensorRT backend")
        self.trt = trt
        self.cudart = cudart = _cudart()
        _ck(cudart.cudaSetDevice(device), "cudaSetDevice")
        name, cc = gpu_info(device)
        check_engine_compat(self.manifest, trt.__version__, name, cc, strict_gpu_name=strict_gpu_name)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {self.path.name} (see the TensorRT log above)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(inputs) != sorted(DENOISER_INPUTS) or len(outputs) != 1:
            raise ArtifactError(f"{self.path.name} has inputs {inputs} / outputs {outputs}, expected x, t, y -> out")
        self.output_name = DENOISER_OUTPUT if DENOISER_OUTPUT in outputs else outputs[0]
        shapes = denoiser_shapes(self.config)
        for n in [*DENOISER_INPUTS, self.output_name]:
            check_dims(n, list(self.engine.get_tensor_shape(n)), shapes.get(n, shapes["out"]), self.path)
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        if hasattr(self.engine, "get_tensor_profile_shape"):  # TRT >= 8.5 / 10 / 11
            prof = self.engine.get_tensor_profile_shape("x", 0)
        else:  # pragma: no cover - pre-10 API
            prof = self.engine.get_profile_shape(0, "x")
        engine_max = profile_max_batch(prof)
        limits = [b for b in (engine_max, max_batch_from_manifest(self.manifest), max_batch) if b]
        self.max_batch = min(limits)
        self.name = f"tensorrt:{name}:{self.manifest.get('precision', 'fp32')}"
        self.stream = _ck(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._per_row = {n: self._row_bytes(n) for n in names}
        self._dev = {n: _ck(cudart.cudaMalloc(self.max_batch * self._per_row[n]), "cudaMalloc") for n in names}
        for n in names:
            self.context.set_tensor_address(n, int(self._dev[n]))
        self.use_graph = bool(cuda_graph)
        self._graphs: dict[int, Any] = {}
        self._shape_n: int | None = None

    def _row_bytes(self, name: str) -> int:
        if name == self.output_name:
            shape = [1, self.config.out_channels, self.config.input_size, self.config.input_size]
        elif name == "x":
            shape = [1, self.config.in_channels, self.config.input_size, self.config.input_size]
        else:
            shape = [1]
        return int(np.prod(shape[1:] or [1])) * self.dtypes[name].itemsize

    def _set_shapes(self, n: int) -> None:
        if self._shape_n == n:
            return
        c, s = self.config.in_channels, self.config.input_size
        ok = (self.context.set_input_shape("x", (n, c, s, s)) and self.context.set_input_shape("t", (n,))
              and self.context.set_input_shape("y", (n,)))
        if ok is False:
            raise DitDeployError(f"TensorRT refused batch {n} (profile max {self.max_batch})")
        self._shape_n = n

    def _enqueue(self, n: int) -> None:
        cudart = self.cudart
        if not self.use_graph:
            if not self.context.execute_async_v3(self.stream):
                raise DitDeployError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            return
        if n not in self._graphs:
            # one plain launch first so TensorRT finishes its lazy per-shape setup outside the capture
            self.context.execute_async_v3(self.stream)
            _ck(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            _ck(cudart.cudaStreamBeginCapture(self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal),
                "cudaStreamBeginCapture")
            self.context.execute_async_v3(self.stream)
            graph = _ck(cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
            self._graphs[n] = _ck(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        _ck(cudart.cudaGraphLaunch(self._graphs[n], self.stream), "cudaGraphLaunch")

    def _run(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        cudart = self.cudart
        n = x.shape[0]
        self._set_shapes(n)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host = {}
        for name, a in (("x", x), ("t", t), ("y", y)):
            host[name] = np.ascontiguousarray(a, dtype=self.dtypes[name])  # e.g. int32 t/y if built so
            _ck(cudart.cudaMemcpyAsync(self._dev[name], host[name].ctypes.data, host[name].nbytes, h2d,
                                       self.stream), "cudaMemcpyAsync")
        self._enqueue(n)
        out = np.empty((n, self.config.out_channels, self.config.input_size, self.config.input_size),
                       dtype=self.dtypes[self.output_name])
        _ck(cudart.cudaMemcpyAsync(out.ctypes.data, self._dev[self.output_name], out.nbytes, d2h, self.stream),
            "cudaMemcpyAsync")
        _ck(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        for g in getattr(self, "_graphs", {}).values():
            cudart.cudaGraphExecDestroy(g)
        for p in getattr(self, "_dev", {}).values():
            cudart.cudaFree(p)
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)
        self._graphs, self._dev, self.stream = {}, {}, None
        self.context = self.engine = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def load_denoiser(path: str | os.PathLike, **opts: Any) -> TensorRTDenoiser:
    """Backend entry point used by :func:`ditdeploy.runtimes.load`."""
    return TensorRTDenoiser(path, **opts)
