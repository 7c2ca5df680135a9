"""torch DiT -> AOTInductor package (``.pt2``), verified and written atomically with its manifest.

``torch.export`` with a dynamic batch, compiled and packaged by ``torch._inductor.aoti_compile_and_package``,
verified against the eager fp32 model.

A ``.pt2`` holds the compiled kernels (a shared library) and the weights; it runs with no Python model code,
on the device it was compiled for (``cpu`` or ``cuda``) and with the torch version that compiled it (the
runtime checks both from the manifest, ``ditdeploy.runtimes.aoti``). Precisions:

- ``fp32``: the model as is;
- ``bf16``: the whole model in bfloat16 (fp32's exponent range: no overflow concern), except the timestep
  sinusoid (the model keeps it in float32) -- I/O stays float32;
- ``fp16``: the project's fp16 policy (``export/fp16.py``: fp16 GEMMs, float32 residual stream, norms,
  conditioning);
- ``fp8``: E4M3 token linears (``export/fp8.py``) inside the bf16 model; needs an FP8 GPU (compute capability
  >= 8.9) and a calibration set.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditdeploy.errors import DitDeployError

SUFFIX = ".pt2"
PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
DEVICES = ("cpu", "cuda")
FP8_MIN_CAPABILITY = (8, 9)  # Ada (8.9) and Hopper (9.0) have FP8 tensor cores

# Export verification against the eager fp32 model uses the per-call limits of ditdeploy.proof.parity.THRESHOLDS for the
# package's precision (one table for every gate; reasons there). fp32 measured 1.4e-7 rel-L2 on digits, far inside
# its 1e-4; the digits bf16 package measured 6.3e-3 on the export probes but 5.8e-2 at its worst timestep in `check`,
# so a stricter export limit would refuse packages that `check` passes.


def check_target(device: str, precision: str) -> None:
    """Refuse, in one line and before any work, a device/precision this machine cannot compile or verify."""
    if device not in DEVICES:
        raise DitDeployError(f"--device {device!r}: choose cpu or cuda")
    if precision not in PRECISIONS:
        raise DitDeployError(f"--precision {precision!r} for --fmt aoti: choose {', '.join(PRECISIONS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise DitDeployError(f"--device cuda: torch {torch.__version__} sees no CUDA device here; export with "
                             "--device cpu, or run the export on the GPU machine that will use the .pt2")
    if device == "cuda":
        from ditdeploy.runtimes.torch_env import find_cuda_toolkit

        home, line = find_cuda_toolkit()
        if home is None:  # torch's C++ build would fail minutes later with "CUDA_HOME environment variable is not set"
            raise DitDeployError(f"--device cuda: {line}")
    if precision == "fp8":
        cap = torch.cuda.get_device_capability() if device == "cuda" else None
        if cap is None or tuple(cap) < FP8_MIN_CAPABILITY:
            where = "a CPU" if cap is None else f"{torch.cuda.get_device_name()} (compute capability {cap[0]}.{cap[1]})"
            raise DitDeployError(f"--precision fp8 needs a GPU with FP8 tensor cores (compute capability >= 8.9, "
                                 f"Ada/Hopper) and --device cuda; this export targets {where}")


class Cast(nn.Module):
    """``net(x.to(dtype), t, y).float()``: a low-precision model behind the float32 denoiser contract."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype, self.config = net, dtype, net.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.dtype), t, y).float()


def cast_module(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` (in place) with its float parameters/buffers in ``dtype``, except inside FP8 linears (E4M3 weights
    and float32 scales stay as they are; ``Module.to(dtype)`` would cast those too)."""
    from ditdeploy.export.fp8 import FP8Linear

    skip = {id(m) for fm in model.modules() if isinstance(fm, FP8Linear) for m in fm.modules()}
    for m in model.modules():
        if id(m) in skip:
            continue
        for p in m.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point():
                setattr(m, name, b.to(dtype))
    return model


def precision_module(model: nn.Module, precision: str, calibration: Any = None) -> tuple[nn.Module, dict | None]:
    """The module to export for ``precision`` (denoiser contract I/O: x float32, t/y int64 -> float32) and, for
    fp8, the quantization summary for the manifest."""
    if precision == "fp32":
        return model, None
    if precision == "fp16":
        from ditdeploy.export.fp16 import DEFAULT_POLICY, HalfDiT

        return HalfDiT(model, DEFAULT_POLICY).eval(), None
    info = None
    if precision == "fp8":
        from ditdeploy.export.fp8 import calibrated_fp8

        inner, info = calibrated_fp8(model, calibration)
    else:
        inner = copy.deepcopy(model)
    return Cast(cast_module(inner, torch.bfloat16), torch.bfloat16).eval(), info


def batch_range(min_batch: int | None, max_batch: int | None) -> tuple[int, int | None]:
    """Validated (min, max) batch of the package; max None = unbounded."""
    lo = 1 if min_batch is None else int(min_batch)
    if lo < 1 or (max_batch is not None and int(max_batch) < lo):
        raise DitDeployError(f"batch range {lo}..{max_batch}: need 1 <= --min-batch <= --max-batch")
    return lo, None if max_batch is None else int(max_batch)


def inductor_options(device: str) -> dict[str, Any]:
    """Inductor settings of the compile. CPU: ``freezing`` (weights treated as constants, so linears are prepacked
    into oneDNN's blocked layout at compile time): S/2 256 batch 2 measured 543 ms per call without it, 145 ms with
    it, ONNX Runtime fp32 212 ms (same inputs, interleaved, shared machine); parity unchanged (~5e-7)."""
    return {"freezing": True} if device == "cpu" else {}


def compile_package(module: Any, config: Any, package: Path, device: str, batch: tuple[int, int | None]) -> None:
    """``torch.export`` ``module`` with a dynamic batch dim in ``batch`` and AOTInductor-package it at ``package``."""
    lo, hi = batch
    n = lo if hi == lo else max(2, lo)  # an example of size 1 would be specialised by torch.export
    dev = torch.device(device)
    args = (torch.randn(n, config.in_channels, config.input_size, config.input_size, device=dev),
            torch.linspace(0, 999, n).round().to(torch.int64).to(dev),
            torch.arange(n, dtype=torch.int64, device=dev) % (config.num_classes + 1))
    shapes = None
    if hi != lo:
        b = torch.export.Dim("batch", min=lo, max=hi) if hi is not None else torch.export.Dim("batch", min=lo)
        shapes = {"x": {0: b}, "t": {0: b}, "y": {0: b}}
    with _quiet(), torch.no_grad():
        try:
            ep = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
        except Exception as e:
            raise DitDeployError(f"torch.export failed: {_first_line(e)}") from e
        try:
            with torch._inductor.config.patch(inductor_options(device)):
                torch._inductor.aoti_compile_and_package(ep, package_path=str(package))
        except Exception as e:
            raise DitDeployError(f"AOTInductor compile failed: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:300]


@contextlib.contextmanager
def _quiet():
    import logging

    names = ["torch._dynamo", "torch._inductor", "torch.export", "torch._export", "torch.fx"]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)


def verify_package(package: Path, manifest: dict[str, Any], reference: Callable[[dict], Any], seed: int,
                   batch_sizes: Sequence[int] = (1, 3)) -> dict[str, Any]:
    """Run the probe inputs of the ONNX path (``ditdeploy.proof.parity.probe_inputs``) through the package on the ditdeploy
    runtime and compare with ``reference`` (eager fp32) by ``check_parity`` (``parity.compare_runs``); NumericsError
    beyond the per-call limits of the package's precision."""
    from ditdeploy.config.variants import DiTConfig
    from ditdeploy.export.verify import check_parity
    from ditdeploy.proof.parity import probe_inputs
    from ditdeploy.runtimes.aoti import AotiDenoiser

    cfg = DiTConfig.from_dict(manifest["config"])
    feeds = probe_inputs(cfg, batch_sizes, seed)
    den = AotiDenoiser(package, manifest=manifest, trust_native_code=True)  # built by this very export
    try:
        res = check_parity(package, reference, feeds, precision=manifest["precision"],
                           what=f"{manifest['precision']} .pt2",
                           run=lambda feed: den(feed["x"], feed["t"], feed["y"]))
    finally:
        den.close()
    res["backend"] = den.name
    return res


def export_denoiser_aoti(
    net: Any,
    out: str | os.PathLike,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    min_batch: int | None = None,
    max_batch: int | None = None,
    verify: bool = True,
    seed: int = 0,
    source: dict[str, Any] | None = None,
    calibration: Any = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export ``net`` (a ``ditdeploy.models.DiT``) to an AOTInductor ``.pt2`` at ``out``; returns the manifest."""
    from ditdeploy.artifact.files import atomic_dir, manifest_path, write_json_atomic
    from ditdeploy.artifact.manifest import make_manifest
    from ditdeploy.export.onnx import PeakRSS, check_out_path
    from ditdeploy.export.verify import torch_reference

    check_target(device, precision)
    out = check_out_path(out, SUFFIX)
    batch = batch_range(min_batch, max_batch)
    if precision == "fp8" and calibration is None:
        raise DitDeployError("--precision fp8 needs --calibration FILE.npz (activation scales; `ditdeploy calibrate`)")
    config = net.config
    net = net.eval().to(device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    with PeakRSS() as rss, atomic_dir([out, manifest_path(out)]) as tmp:
        module, fp8_info = precision_module(net, precision, calibration)
        tc = time.perf_counter()
        compile_package(module, config, tmp / out.name, device, batch)
        timings["compile_s"] = time.perf_counter() - tc
        rss.lap("compile")
        del module
        manifest = make_manifest(
            tmp / out.name, [tmp / out.name], kind="denoiser", format="aoti", precision=precision, device=device,
            config=dataclasses.asdict(config),
            io={"inputs": {"x": ["batch", config.in_channels, config.input_size, config.input_size],
                           "t": ["batch"], "y": ["batch"]},
                "outputs": {"out": ["batch", config.out_channels, config.input_size, config.input_size]},
                "dtypes": {"x": "float32", "t": "int64", "y": "int64", "out": "float32"}},
            batch={"min": batch[0], "max": batch[1]}, torch=_torch_info(device), fp8=fp8_info,
            exporter=f"torch.export + torch._inductor.aoti_compile_and_package (torch {torch.__version__})",
            inductor_options=inductor_options(device),
            source=source, **(extra or {}))
        parity = None
        if verify:
            tv = time.perf_counter()
            parity = verify_package(tmp / out.name, manifest, torch_reference(_on_cpu_output(net)), seed)
            timings["verify_s"] = time.perf_counter() - tv
            rss.lap("verify")
        else:
            warnings.warn(f"{out.name}: verification skipped (--no-verify): parity is NOT checked", stacklevel=2)
        timings["total_s"] = time.perf_counter() - t0
        timings["cpu_s"] = time.process_time() - cpu0
        manifest.update(parity=parity, verified=parity is not None, compile_seconds=round(timings["compile_s"], 3),
                        export_seconds=round(timings["total_s"], 3),
                        timings={k: round(v, 3) for k, v in timings.items()}, peak_rss_bytes=rss.peak,
                        peak_rss_bytes_by_stage=rss.stages)
        write_json_atomic(tmp / manifest_path(out).name, manifest)
    from ditdeploy.artifact.trust import record_trusted

    record_trusted(manifest["files"][out.name]["sha256"], out, "aoti")  # this installation built it (ditdeploy.artifact.trust)
    return manifest


def _on_cpu_output(net: Any) -> Any:
    """``net`` taking host tensors and returning host tensors (the reference for a CUDA export runs on the GPU)."""
    dev = next(net.parameters()).device
    if dev.type == "cpu":
        return net

    def run(x, t, y):
        return net(x.to(dev), t.to(dev), y.to(dev)).cpu()

    return run


def _torch_info(device: str) -> dict[str, Any]:
    """torch version (a .pt2 only loads with the torch that compiled it) and, for CUDA, the GPU it was built on."""
    info: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda}
    if device == "cuda":
        cap = torch.cuda.get_device_capability()
        info["gpu"] = {"name": torch.cuda.get_device_name(), "compute_capability": f"{cap[0]}.{cap[1]}"}
    else:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info
