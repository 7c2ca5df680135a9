"""CUDA pieces of the TensorRT backend (cuda-python): checked calls, errors by name, a CUDA-graph executor.

The bindings are cuda-python's runtime bindings. Polygraphy's ``TrtRunner`` runs the plain path; it has no
CUDA-graph mode, hence the executor here.

Every cuda-python call returns ``(cudaError_t, *values)``; :func:`ck` unpacks it and raises a one-line error
that names the error (``cudaGetErrorName``, e.g. ``cudaErrorMemoryAllocation``), not its number. Every
``execute_async_v3`` is checked, in the CUDA-graph capture too; a capture that fails is ended and its graph
destroyed; an instantiated graph's template is destroyed at once (``cudaGraphDestroy``) and each executable
graph at close (``cudaGraphExecDestroy``).
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
    """Fixed device buffers (sized for ``max_batch``) and, per batch size, its own execution context and CUDA graph.

    A captured graph fixes the shapes and tensor addresses it was recorded with, and TensorRT may stage shape data
    through its context during an enqueue; so each batch size gets a dedicated context (input shapes set once,
    before its capture) instead of one context whose shapes change between replays. Replays run one after another
    on one stream, so the I/O buffers are shared.
    """

    def __init__(self, engine: Any, names: list[str], row_bytes: dict[str, int], max_batch: int):
        self.rt = rt = cudart()
        self.engine, self.names = engine, names
        self.stream = ck(rt, rt.cudaStreamCreate(), "cudaStreamCreate")
        self.dev = {n: ck(rt, rt.cudaMalloc(max_batch * row_bytes[n]), "cudaMalloc") for n in names}
        self.graphs: dict[int, Any] = {}
        self.contexts: dict[int, Any] = {}

    def _context(self, shapes: dict[str, tuple[int, ...]]) -> Any:
        ctx = self.engine.create_execution_context()
        if ctx is None:
            raise DitDeployError("TensorRT could not create an execution context (out of GPU memory?)")
        for n in self.names:
            if not ctx.set_tensor_address(n, int(self.dev[n])):
                raise DitDeployError(f"TensorRT refused the device address of {n!r}")
        for n, shape in shapes.items():
            if not ctx.set_input_shape(n, shape):
                raise DitDeployError(f"TensorRT refused shape {shape} for {n!r}")
        return ctx

    def run(self, inputs: dict[str, np.ndarray], out: np.ndarray, out_name: str) -> np.ndarray:
        """Copy ``inputs`` in, launch the graph for this batch (captured on first use), copy ``out`` back."""
        rt = self.rt
        n = out.shape[0]
        for name, a in inputs.items():
            ck(rt, rt.cudaMemcpyAsync(self.dev[name], a.ctypes.data, a.nbytes,
                                      rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream), "cudaMemcpyAsync H2D")
        if n not in self.graphs:
            self.contexts[n] = self._context({k: a.shape for k, a in inputs.items()})
            self.graphs[n] = self._capture(self.contexts[n])
        ck(rt, rt.cudaGraphLaunch(self.graphs[n], self.stream), "cudaGraphLaunch")
        ck(rt, rt.cudaMemcpyAsync(out.ctypes.data, self.dev[out_name], out.nbytes,
                                  rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream), "cudaMemcpyAsync D2H")
        ck(rt, rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return out

    def _capture(self, context: Any) -> Any:
        """Capture one ``execute_async_v3`` of ``context`` on the stream; returns the instantiated graph."""
        rt = self.rt
        # one plain launch first so TensorRT does its lazy per-shape setup outside the capture
        execute(context, self.stream, "before the CUDA-graph capture")
        ck(rt, rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        ck(rt, rt.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        try:
            execute(context, self.stream, "during the CUDA-graph capture")
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
        """Destroy the executable graphs, drop the contexts, free the buffers and the stream (idempotent)."""
        rt = self.rt
        for g in self.graphs.values():
            rt.cudaGraphExecDestroy(g)
        self.graphs, self.contexts = {}, {}
        for p in self.dev.values():
            rt.cudaFree(p)
        if self.stream is not None:
            rt.cudaStreamDestroy(self.stream)
        self.dev, self.stream = {}, None
