"""The CPU's instruction sets, detected once, and what they mean for INT8.

:func:`detect` reads ``/proc/cpuinfo`` once per process (Linux; elsewhere the flag set is empty) and returns a
:class:`CpuIsa`: the architecture and the flags that decide which kernels the runtimes pick (AVX2, AVX-512F/BW,
AVX-512 VNNI, AVX-VNNI, AVX512-BF16, AMX). ``DITDEPLOY_CPU_ISA`` overrides the flags (a comma- or space-separated
list such as ``avx2,fma``; ``none`` for no flags): tests use it to take the decisions of another CPU, a user to
export for a target machine. :meth:`CpuIsa.record` is what manifests and bench/check results record.

Why VNNI matters (docs/export.md "INT8 forms by CPU"): without VNNI, x86 int8 GEMM kernels (ONNX Runtime's MLAS u8s8 on AVX2 and
AVX-512BW) multiply uint8 activations by int8 weights with ``vpmaddubsw``, which adds each pair of products into a
saturating 16-bit lane: 2 x 255 x 127 = 64770 does not fit in int16 (32767), so large activations times full-range
int8 weights are clipped. VNNI (``vpdpbusd``) and AMX add the products into 32-bit lanes. 7-bit weights (|w| <= 64:
2 x 255 x 64 = 32640) never saturate. ``INT8_TARGETS`` names the artifact forms ``export --int8-target`` chooses
between.

Numpy-free, stdlib only (the deploy path imports it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from dataclasses import dataclass
from typing import Any

from ditdeploy.errors import DitDeployError

__all__ = ["ENV", "INT8_TARGETS", "ISA_FLAGS", "CpuIsa", "cpuinfo", "detect", "resolve_activations", "resolve_int8_target"]

ENV = "DITDEPLOY_CPU_ISA"
# The flags that decide inference kernels, in the order they are reported (Linux /proc/cpuinfo names).
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "sve", "asimd", "asimddp")
# Instructions that add u8 x s8 products into 32-bit lanes (no 16-bit intermediate): VNNI's vpdpbusd, AMX's tiles.
_INT32_DOT = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})

# INT8 artifact forms, by the machine that runs them (``export --int8-target``; ``auto`` = this CPU's):
INT8_TARGETS = {
    "cpu-vnni": "x86 CPU with VNNI/AMX (or a non-x86 CPU): full-range int8 weights",
    "cpu-avx2": "x86 CPU without VNNI (AVX2, AVX-512 without VNNI): 7-bit weights (reduce_range), no int16 saturation",
    "trt": "TensorRT (GPU): symmetric int8 Q/DQ with full-range int8 weights",
}


@dataclass(frozen=True)
class CpuIsa:
    """The CPU's architecture and inference-relevant ISA flags (from /proc/cpuinfo, or ``DITDEPLOY_CPU_ISA``)."""

    arch: str
    flags: frozenset[str]
    source: str  # "cpuinfo" | "DITDEPLOY_CPU_ISA" | "unknown"

    @property
    def x86(self) -> bool:
        return self.arch.lower() in _X86

    @property
    def vnni(self) -> bool:
        """u8 x s8 dot products into 32-bit lanes (AVX-512 VNNI, AVX-VNNI or AMX-INT8)."""
        return bool(self.flags & _INT32_DOT)

    @property
    def int8_saturates(self) -> bool:
        """True where full-range int8 weights can saturate (x86 int8 GEMMs without VNNI pair-add into int16)."""
        return self.x86 and not self.vnni

    @property
    def int8_target(self) -> str:
        """The INT8 form for a CPU artifact run on this CPU (``auto``)."""
        return "cpu-avx2" if self.int8_saturates else "cpu-vnni"

    def label(self) -> str:
        """One short line naming the CPU's ISA, e.g. ``x86_64 avx2,fma (no VNNI: int8 pairs saturate in int16)``."""
        flags = ",".join(f for f in ISA_FLAGS if f in self.flags) or "no SIMD flags recorded"
        note = "" if not self.x86 else (" (VNNI)" if self.vnni else " (no VNNI: int8 pairs saturate in int16)")
        src = "" if self.source == "cpuinfo" else f" [{self.source}]"
        return f"{self.arch} {flags}{note}{src}"

    def record(self) -> dict[str, Any]:
        """What manifests and bench/check results record (``cpu_isa``)."""
        return {"arch": self.arch, "flags": [f for f in ISA_FLAGS if f in self.flags], "vnni": self.vnni,
                "int8_saturates": self.int8_saturates, "int8_target": self.int8_target, "source": self.source}


def cpuinfo() -> dict[str, str]:
    """The first processor's ``/proc/cpuinfo`` fields (empty where there is none)."""
    return dict(_cpuinfo())


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[tuple[str, str], ...]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break  # the first processor is enough: the flags are the same on every core
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                out.setdefault(k, v)
    return tuple(out.items())


def _all_flags() -> frozenset[str]:
    ci = cpuinfo()
    return frozenset(ci.get("flags", ci.get("Features", "")).split())


@functools.lru_cache(maxsize=8)
def _detect(override: str | None) -> CpuIsa:
    arch = platform.machine() or "unknown"
    if override is not None:
        names = {f.strip().lower() for f in override.replace(",", " ").split()} - {"none"}
        unknown = sorted(names - set(ISA_FLAGS))
        if unknown:
            raise DitDeployError(f"{ENV}={override!r}: unknown flag(s) {', '.join(unknown)}; use names from "
                                 f"/proc/cpuinfo: {', '.join(ISA_FLAGS)} (or 'none')")
        return CpuIsa(arch, frozenset(names), ENV)
    flags = _all_flags()
    return CpuIsa(arch, frozenset(f for f in ISA_FLAGS if f in flags), "cpuinfo" if flags else "unknown")


def detect() -> CpuIsa:
    """This CPU's ISA (read once per process), or the flags ``DITDEPLOY_CPU_ISA`` names."""
    return _detect(os.environ.get(ENV))


def resolve_int8_target(target: str | None) -> str:
    """``auto``/None -> this CPU's INT8 form (:attr:`CpuIsa.int8_target`); a known name passes; else an error."""
    t = (target or "auto").strip().lower()
    if t == "auto":
        return detect().int8_target
    if t not in INT8_TARGETS:
        raise DitDeployError(f"unknown INT8 target {target!r}: choose auto, {', '.join(INT8_TARGETS)}")
    return t


def resolve_activations(activations: str | None, target: str, mode: str, fmt: str = "onnx") -> str:
    """``auto``/None -> the static INT8 activations for a resolved ``target``: uint8 (asymmetric, ONNX Runtime's
    u8s8 kernels and CPU fusions) for ``cpu-avx2`` written as ONNX, int8 (symmetric Q/DQ: TensorRT-ready,
    OpenVINO's int8 path, OpenVINO IR) otherwise. Measured on XL/2 per call at batch 2 (docs/export.md "INT8 forms
    by CPU"): on AVX2-only kernels uint8 activations are 1.74x fp32 vs 1.58x for int8 ones (as fast as dynamic
    INT8); on a VNNI/AMX CPU OpenVINO's int8 path with the bf16 hint is the fastest form, so ``cpu-vnni`` keeps
    int8. Dynamic INT8 quantizes activations to uint8 at run time whatever this says."""
    a = (activations or "auto").strip().lower()
    if a != "auto":
        return a
    return "uint8" if target == "cpu-avx2" and mode == "static" and fmt == "onnx" else "int8"
