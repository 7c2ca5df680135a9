"""CUDA execution for the torch-based backends: inputs staged once per call, optional CUDA graphs.

The torch-based backends are ``torch`` and ``aoti``. Per call, the numpy inputs are copied into pinned host
buffers and from there, asynchronously, into device buffers that persist per batch size (one host->device copy
per input per call, no allocation); the output comes back through a pinned buffer after one stream
synchronisation. With ``graph=True`` the model call is captured once per batch size (after warm-up calls on a
side stream, as torch's CUDA-graph documentation prescribes) and replayed on later calls with the same batch:
no per-kernel launch cost, which dominates small batches.

Imports torch; loaded only by the torch-based backends, and only on a CUDA device. Not executed in this
project's CI (no GPU); the CPU-visible behaviour (``--cuda-graph`` on a CPU device is an error) is tested
there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ditdeploy.errors import DitDeployError


def require_cuda_for_graph(device: Any, what: str) -> None:
    """``--cuda-graph`` only exists on CUDA: a one-line error otherwise."""
    if getattr(device, "type", str(device)).split(":")[0] != "cuda":
        raise DitDeployError(f"--cuda-graph needs a CUDA device; {what} runs on {device} (CUDA graphs do not exist "
                             "on CPU): drop --cuda-graph")


@dataclass
class _Slot:
    host: list[Any]  # pinned host buffers x, t, y
    dev: list[Any]  # device buffers x, t, y
    out_host: Any = None
    graph: Any = None
    out_dev: Any = None


class StagedCall:
    """``call(x, t, y) -> np.ndarray`` running ``fn`` on ``device`` from numpy inputs; see the module docstring."""

    def __init__(self, fn: Callable[..., Any], device: Any, graph: bool = False, warmup: int = 2):
        import torch

        self.torch, self.fn, self.device, self.use_graph, self.warmup = torch, fn, torch.device(device), graph, warmup
        if graph:
            require_cuda_for_graph(self.device, "this model")
        self.stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self.slots: dict[int, _Slot] = {}

    def _slot(self, arrays: tuple[np.ndarray, ...]) -> _Slot:
        torch = self.torch
        n = arrays[0].shape[0]
        if n not in self.slots:
            host = [torch.empty(a.shape, dtype=torch.from_numpy(a[:0]).dtype, pin_memory=True) for a in arrays]
            self.slots[n] = _Slot(host=host, dev=[torch.empty_like(h, device=self.device) for h in host])
        return self.slots[n]

    def _capture(self, s: _Slot) -> None:
        torch = self.torch
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(self.stream)
        try:
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(self.warmup):
                    self.fn(*s.dev)
            self.stream.wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(g, stream=self.stream):
                s.out_dev = self.fn(*s.dev)
        except Exception as e:  # capture refuses e.g. host syncs inside the model
            raise DitDeployError(f"--cuda-graph: capture failed at batch {s.dev[0].shape[0]} "
                                 f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}): "
                                 "run without --cuda-graph") from e
        s.graph = g

    def __call__(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        torch = self.torch
        s = self._slot((x, t, y))
        with torch.cuda.stream(self.stream):
            for h, d, a in zip(s.host, s.dev, (x, t, y), strict=True):
                h.numpy()[...] = a
                d.copy_(h, non_blocking=True)
            if self.use_graph:
                if s.graph is None:
                    self._capture(s)
                s.graph.replay()
                out = s.out_dev
            else:
                with torch.inference_mode():
                    out = self.fn(*s.dev)
            if s.out_host is None or s.out_host.shape != out.shape:
                s.out_host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
            s.out_host.copy_(out, non_blocking=True)
        self.stream.synchronize()
        return s.out_host.numpy().copy()

    def close(self) -> None:
        """Drop captured graphs and buffers."""
        self.slots.clear()
