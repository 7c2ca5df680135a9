"""CUDA pieces of the TensorRT backend (cuda-python runtime bindings): checked calls, errors by name, and the
CUDA-graph executor (Polygraphy's ``TrtRunner`` runs the plain path; it has no CUDA-graph mode).

Every cuda-python call returns ``(cudaError_t, *values)``; :func:`ck` unpacks it and raises a one-line error that
names the error (``cudaGetErrorName``, e.g. ``cudaErrorMemoryAllocation``), not its number. Every
``execute_async_v3`` is checked, in the CUDA-graph capture too; a capture that fails is ended and its graph
destroyed; an instantiated graph's template is destroyed at once (``cudaGraphDestroy``) and each executable graph
at close (``cudaGraphExecDestroy``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ditdeploy.errors import DitDeployError

__all__ = ["CudaGraphExecutor", "ck", "cuda_error_name", "cudart"]


def cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime`` >= 12.6, else ``cuda.cudart``)."""
    try:
        from cuda.bindings import runtime as rt  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as rt  # older cuda-python
        except ImportError as e:
            from ditdeploy.errors import MissingDependencyError

            raise MissingDependencyError("cuda-python", "tensorrt", "the TensorRT backend") from e
    return rt


def cuda_error_name(rt: Any, err: Any) -> str:
    """``cudaGetErrorName(err)`` as text (falls back to the enum's own name / number)."""
    try:
        ret = rt.cudaGetErrorName(err)
        name = ret[1] if isinstance(ret, tuple) else ret
        return name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    except Exception:  # the name lookup itself failed: still say something useful
        return str(getattr(err, "name", err))


def ck(rt: Any, ret: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` return; raise naming the error when it is not cudaSuccess (0)."""
    if isinstance(ret, tuple):
        err, vals = ret[0], ret[1:]
    else:
        err, vals = ret, ()
    if int(getattr(err, "value", err)) != 0:
        raise DitDeployError(f"CUDA error in {what}: {cuda_error_name(rt, err)}")
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else vals


def execute(context: Any, stream: Any, where: str) -> None:
    """``execute_async_v3`` with its boolean result checked."""
    if not context.execute_async_v3(int(stream)):
        raise DitDeployError(f"TensorRT execute_async_v3 failed {where} (see the TensorRT log above)")


class CudaGraphExecutor:
    """One execution context with fixed device buffers (sized for ``max_batch``) and a CUDA graph per batch size."""

    def __init__(self, engine: Any, names: list[str], row_bytes: dict[str, int], max_batch: int):
        self.rt = rt = cudart()
        self.context = engine.create_execution_context()
        if self.context is None:
            raise DitDeployError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = ck(rt, rt.cudaStreamCreate(), "cudaStreamCreate")
        self.row_bytes = row_bytes
        self.dev = {n: ck(rt, rt.cudaMalloc(max_batch * row_bytes[n]), "cudaMalloc") for n in names}
        for n in names:
            if not self.context.set_tensor_address(n, int(self.dev[n])):
                raise DitDeployError(f"TensorRT refused the device address of {n!r}")
        self.graphs: dict[int, Any] = {}

    def run(self, inputs: dict[str, np.ndarray], out: np.ndarray, out_name: str) -> np.ndarray:
        """Copy ``inputs`` in, launch the graph for this batch (captured on first use), copy ``out`` back."""
        rt = self.rt
        n = out.shape[0]
        for name, a in inputs.items():
            ok = self.context.set_input_shape(name, a.shape)
            if ok is False:
                raise DitDeployError(f"TensorRT refused shape {a.shape} for {name!r}")
            ck(rt, rt.cudaMemcpyAsync(self.dev[name], a.ctypes.data, a.nbytes,
                                      rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream), "cudaMemcpyAsync H2D")
        if n not in self.graphs:
            self.graphs[n] = self._capture()
        ck(rt, rt.cudaGraphLaunch(self.graphs[n], self.stream), "cudaGraphLaunch")
        ck(rt, rt.cudaMemcpyAsync(out.ctypes.data, self.dev[out_name], out.nbytes,
                                  rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream), "cudaMemcpyAsync D2H")
        ck(rt, rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return out

    def _capture(self) -> Any:
        """Capture one ``execute_async_v3`` for the current shapes; returns the instantiated graph."""
        rt = self.rt
        # one plain launch first so TensorRT does its lazy per-shape setup outside the capture
        execute(self.context, self.stream, "before the CUDA-graph capture")
        ck(rt, rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        ck(rt, rt.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        try:
            execute(self.context, self.stream, "during the CUDA-graph capture")
        except Exception:
            ret = rt.cudaStreamEndCapture(self.stream)  # leave capture mode; discard the partial graph
            if isinstance(ret, tuple) and len(ret) > 1 and ret[1] is not None:
                rt.cudaGraphDestroy(ret[1])
            raise
        graph = ck(rt, rt.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        try:
            return ck(rt, rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            ck(rt, rt.cudaGraphDestroy(graph), "cudaGraphDestroy")

    def close(self) -> None:
        """Destroy the executable graphs, free the buffers and the stream (idempotent)."""
        rt = self.rt
        for g in self.graphs.values():
            rt.cudaGraphExecDestroy(g)
        for p in self.dev.values():
            rt.cudaFree(p)
        if self.stream is not None:
            rt.cudaStreamDestroy(self.stream)
        self.graphs, self.dev, self.stream, self.context = {}, {}, None, None
