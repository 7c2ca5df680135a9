"""What machine a benchmark ran on, and how fast it multiplies matrices (the roofline's compute roof).

``machine_info()`` records CPU model, cores, the ISA flags that matter for inference (AVX-512, VNNI, BF16, AMX, FP16),
memory, load average and library versions, so a recorded number can be judged later. ``matmul_peak(precision)``
measures achieved GEMM throughput per precision with whatever is installed, torch-free first:

* fp32: numpy (BLAS) and OpenVINO f32 ``MatMul``; the best is the peak.
* bf16: OpenVINO ``MatMul`` with ``INFERENCE_PRECISION_HINT=bf16``, and torch bf16 ``matmul`` when torch is present.
* int8: torch's ``_int_mm`` (int8 x int8 -> int32) when torch is present; otherwise not measured.

The probes are square n x n GEMMs; FLOPs = 2 n^3. They measure what this machine achieves under its current load
(other processes share the cores), which is why the load average is recorded too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def cpu_flags() -> set[str]:
    """The CPU's inference-relevant ISA flags (``ditdeploy.system.cpu_isa.detect``: /proc/cpuinfo, or DITDEPLOY_CPU_ISA)."""
    from ditdeploy.system.cpu_isa import detect

    return set(detect().flags)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, relevant ISA flags, memory, load, OS and library versions."""
    from ditdeploy.artifact.files import tool_versions
    from ditdeploy.system.cpu_isa import cpuinfo, detect

    ci, isa = cpuinfo(), detect()
    info: dict[str, Any] = {
        "cpu": ci.get("model name") or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "cpu_id": {k: ci.get(k) for k in ("vendor_id", "cpu family", "model", "stepping", "microcode") if ci.get(k)},
        "logical_cpus": os.cpu_count(),
        "flags": isa.record()["flags"],
        "cpu_isa": isa.record(),
        "os": f"{platform.system()} {platform.release()}",
    }
    with contextlib.suppress(AttributeError, OSError):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover - psutil is a core dependency
        pass
    with contextlib.suppress(OSError, AttributeError):
        info["load_avg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    info["hypervisor"] = "hypervisor" in ci.get("flags", "").split()
    if os.environ.get("DITDEPLOY_CPUID_MASK"):  # experiments/cpu_mask.py: CPUID reports an AVX2-only CPU
        info["cpuid_mask"] = {"isa": os.environ["DITDEPLOY_CPUID_MASK"], "how": (
            "experiments/cpuid_mask.c (LD_PRELOAD, CPUID faulting): the runtimes ran their AVX2 kernels on this "
            "machine's cores; 'cpu' and 'cpu_id' name the host, 'flags' what the masked CPU reports")}
    versions = tool_versions()
    import importlib.metadata as md

    for dist in ("diffusers", "polygraphy", "matplotlib", "psutil"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[dist] = md.version(dist)
    info["versions"] = versions
    info["gpu"] = gpu_name()
    return info


def gpu_name() -> str | None:
    """Name of GPU 0 via NVML when pynvml and a GPU are present, else None."""
    if importlib.util.find_spec("pynvml") is None:
        return None
    try:  # pragma: no cover - no GPU on the CI machines
        import pynvml

        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        return n.decode() if isinstance(n, bytes) else str(n)
    except Exception:
        return None


def cuda_info() -> dict[str, Any] | None:
    """GPU 0 as torch sees it (name, compute capability, memory, SMs, CUDA/cuDNN versions) plus the driver version
    (NVML, else ``nvidia-smi``); None without torch or a CUDA device."""
    from ditdeploy.proof.reference_check import has_torch

    if not has_torch():
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "name": p.name,
        "compute_capability": f"{p.major}.{p.minor}",
        "total_memory_gib": round(p.total_memory / 2**30, 2),
        "multiprocessors": p.multi_processor_count,
        "device_count": torch.cuda.device_count(),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "driver": None,
    }
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        d = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = d.decode() if isinstance(d, bytes) else str(d)
    if info["driver"] is None:
        with contextlib.suppress(Exception):
            import subprocess

            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    return info


def gpu_memory_used_mb() -> float | None:
    """Used memory of GPU 0 in MiB (NVML), or None without a GPU."""
    if importlib.util.find_spec("pynvml") is None:
        return None
    try:  # pragma: no cover - no GPU on the CI machines
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / 2**20
    except Exception:
        return None


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (thread pools, JIT kernels, first-touch pages)
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _openvino_matmul(n: int, hint: str) -> Callable[[], Any] | None:
    if importlib.util.find_spec("openvino") is None:
        return None
    import openvino as ov

    try:
        ops = ov.opset13
    except AttributeError:  # pragma: no cover - older OpenVINO
        import openvino.runtime.opset13 as ops
    a = ops.parameter([n, n], ov.Type.f32)
    b = ops.parameter([n, n], ov.Type.f32)
    model = ov.Model([ops.matmul(a, b, False, False)], [a, b])
    from ditdeploy.runtimes.base import physical_cores
    from ditdeploy.runtimes.openvino import compile_cpu

    compiled = compile_cpu(model, {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                                   "INFERENCE_NUM_THREADS": physical_cores()})
    req = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    xa, xb = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    return lambda: req.infer([xa, xb])


def _torch_matmul(n: int, dtype: str) -> Callable[[], Any] | None:
    from ditdeploy.proof.reference_check import has_torch

    if not has_torch():
        return None
    try:
        import torch
    except ImportError:
        return None
    if dtype == "int8":
        if not hasattr(torch, "_int_mm"):
            return None
        a = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        b = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        fn = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        a, b = torch.rand(n, n).to(dt), torch.rand(n, n).to(dt)
        fn = lambda: a @ b  # noqa: E731
    try:
        fn()
    except RuntimeError:
        return None
    return fn


def matmul_peak(precision: str, n: int = 2048, repeats: int = 3) -> dict[str, Any]:
    """Best measured GEMM GFLOP/s for ``precision`` (fp32, bf16, int8) over the available probes.

    Returns ``{"gflops": float | None, "probe": name of the fastest, "probes": {name: gflops}, "n": n}``.
    """
    flops = 2.0 * n**3
    cands: dict[str, Callable[[], Callable[[], Any] | None]] = {}
    if precision == "fp32":
        rng = np.random.default_rng(0)
        a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
        cands["numpy fp32"] = lambda: (lambda: a @ b)
        cands["openvino f32"] = lambda: _openvino_matmul(n, "f32")
        cands["torch fp32"] = lambda: _torch_matmul(n, "fp32")
    elif precision == "bf16":
        cands["openvino bf16"] = lambda: _openvino_matmul(n, "bf16")
        cands["torch bf16"] = lambda: _torch_matmul(n, "bf16")
    elif precision == "int8":
        cands["torch int8 _int_mm"] = lambda: _torch_matmul(n, "int8")
    else:
        raise ValueError(f"no matmul probe for precision {precision!r}")
    probes: dict[str, float] = {}
    for name, make in cands.items():
        try:
            fn = make()
        except Exception:  # a probe that cannot be built on this install is simply absent
            fn = None
        if fn is None:
            continue
        probes[name] = round(flops / _best_seconds(fn, repeats) / 1e9, 2)
    if not probes:
        return {"gflops": None, "probe": None, "probes": {}, "n": n}
    best = max(probes, key=probes.get)
    return {"gflops": probes[best], "probe": best, "probes": probes, "n": n}


def peak_for(precision: str) -> str:
    """Which measured peak a row of ``precision`` is compared against (fp16 on a CPU runs as fp32 arithmetic)."""
    p = precision.lower()
    if p in ("bf16",):
        return "bf16"
    if p in ("int8",):
        return "int8"
    return "fp32"
