"""torch DiT -> verified ONNX denoiser (fp32 or fp16-with-fp32-islands), written atomically with its manifest.

Pipeline: ``torch.onnx.export(..., dynamo=True)`` (the legacy TorchScript exporter produced a silently wrong DiT-like
graph on this machine: rel-L2 0.19), onnxscript/onnx_ir graph passes (constant folding with shape inference, dead
nodes, CSE; see ``optimize_graph``), a small
cleanup (pure-permutation Einsum -> Transpose, batch dim named ``batch``, metadata), save into a temporary directory
(external data in ONE file ``<name>.onnx.data`` beside the model, relative location, when the weights pass the
protobuf limit), parity check on ONNX Runtime CPU against the fp32 torch model, manifest last, then rename into place.
A failed check raises ``NumericsError`` and leaves nothing at the final path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ditdeploy.errors import DitDeployError
from ditdeploy.export.graph import (  # noqa: F401 - re-exported: the names callers import from here
    DEFAULT_OPSET,
    MIN_OPSET,
    cleanup,
    dynamo_export,
    graph_stats,
    quiet_exporter,
    set_metadata,
)
from ditdeploy.export.onnxscript_compat import drop_weights, optimize_graph  # noqa: F401
from ditdeploy.export.profiling import PeakRSS, _stage_bar, process_peak_rss  # noqa: F401
from ditdeploy.export.protobuf_writer import (  # noqa: F401
    EXTERNAL_DATA_THRESHOLD,
    save_inline_streaming,
    save_model,
)

# Protobuf caps a serialized ModelProto at 2 GiB: above this many initializer bytes, weights go to external data.
PRECISIONS = ("fp32", "fp16")


# --------------------------------------------------------------------------------------------------------- helpers




























def check_out_path(out_path: str | os.PathLike, suffix: str = ".onnx") -> Path:
    """Validate an output path's suffix and parent; return it as a Path."""
    out = Path(out_path)
    if out.suffix != suffix:
        raise DitDeployError(f"output {out} must end with {suffix}")
    if out.exists() and out.is_dir():
        raise DitDeployError(f"output {out} is a directory: give a file name ending in {suffix}")
    return out


def readable(*paths: Path) -> None:
    """Give files written through mkstemp (mode 0600) the usual 0644 minus umask."""
    mask = os.umask(0)
    os.umask(mask)
    for p in paths:
        with contextlib.suppress(OSError):
            os.chmod(p, 0o644 & ~mask)


def move_into_place(tmp_files: Sequence[Path], out: Path, stale: Sequence[Path] = ()) -> None:
    """Remove stale siblings of a previous export that the new one does not have (e.g. an old external data file)."""
    names = {p.name for p in tmp_files}
    for s in stale:
        if s.name not in names:
            with contextlib.suppress(FileNotFoundError):
                s.unlink()


def _release(model: Any) -> None:
    """Drop the storage of a torch module's parameters and buffers (moved to the meta device)."""
    import gc

    model.to_empty(device="meta")
    gc.collect()
    with contextlib.suppress(Exception):  # glibc: hand freed heap pages back to the OS (fragmented otherwise)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --------------------------------------------------------------------------------------------------------- denoiser
def export_denoiser_onnx(
    model: Any,
    out_path: str | os.PathLike,
    *,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    batch_sizes: Sequence[int] = (1, 3),
    batch_max: int | None = None,
    fp16_policy: Any = None,
    tolerance: dict[str, float] | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    seed: int = 0,
    source: dict[str, Any] | None = None,
    decoder: str | None = None,
    extra: dict[str, Any] | None = None,
    progress: bool = False,
    release_model: bool = False,
) -> dict[str, Any]:
    """Export a ``ditdeploy.models.DiT`` to a verified ONNX denoiser at ``out_path``; return the manifest dict.

    Graph: inputs ``x`` f32 (batch,C,H,W), ``t`` i64 (batch,), ``y`` i64 (batch,); output ``out`` f32
    (batch,out_C,H,W). ``precision="fp16"`` exports ``HalfDiT(model, fp16_policy)`` (fp16 GEMMs, fp32 islands, f32
    I/O). With ``verify`` (default) ONNX Runtime CPU is compared with the fp32 torch model at each of
    ``batch_sizes`` and the export fails (``NumericsError``, nothing written) beyond ``tolerance`` (default
    the per-call limits of ``ditdeploy.proof.parity.THRESHOLDS[precision]``). ``source`` (e.g. checkpoint path + sha256) and ``decoder`` (file name of a VAE
    decoder artifact beside it) go into the manifest, as does everything in ``extra``. ``release_model`` frees the
    model's weights (moved to the meta device: the model is unusable afterwards) once the torch reference outputs
    are computed, so the torch weights and the ONNX Runtime session are never in memory together (the CLI does
    this: peak RSS ~1.3x instead of ~2.3x the weight bytes for XL/2).
    """
    from ditdeploy.artifact.files import atomic_dir, manifest_path, write_json_atomic

    config = _check_args(model, precision, opset, batch_sizes)
    out = check_out_path(out_path)
    data_final = out.with_name(out.name + ".data")
    man_final = manifest_path(out)
    dev = next(model.parameters()).device
    if dev.type != "cpu":  # e.g. a model trained on CUDA: the graph is traced and its weights saved from host memory
        model.to("cpu")
    was_training = model.training
    model.eval()
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    timings: dict[str, float] = {}
    try:
        with PeakRSS() as rss, atomic_dir([data_final, out, man_final]) as tmp:
            bar = _stage_bar(4, progress, f"export {out.name}")
            bar.set_description(f"export {out.name}: trace + convert")
            t0 = time.perf_counter()
            ir_model, changes, stats, policy = _trace(model, config, precision, opset, fp16_policy)
            timings["export_s"] = time.perf_counter() - t0
            rss.lap("export")
            bar.update(1)

            bar.set_description(f"export {out.name}: save")
            t0 = time.perf_counter()
            files = save_model(ir_model, tmp / out.name, external_data_threshold)
            drop_weights(ir_model)
            del ir_model
            timings["save_s"] = time.perf_counter() - t0
            rss.lap("save")
            bar.update(1)

            parity = None
            if verify:
                bar.set_description(f"export {out.name}: verify on ORT CPU")
                t0 = time.perf_counter()
                parity = _verify(model, tmp / out.name, config, precision, batch_sizes, seed, tolerance,
                                 release_model)
                timings["verify_s"] = time.perf_counter() - t0
                rss.lap("verify")
            else:
                warnings.warn(f"{out.name}: verification skipped (--no-verify): parity is NOT checked",
                              stacklevel=2)
                if release_model:
                    _release(model)
            bar.update(1)

            bar.set_description(f"export {out.name}: manifest")
            timings["total_s"] = time.perf_counter() - t_start
            timings["cpu_s"] = time.process_time() - cpu_start
            manifest = _denoiser_manifest(
                tmp / out.name, files, config, precision=precision, opset=opset, batch_sizes=batch_sizes,
                batch_max=batch_max, parity=parity, policy=policy, stats=stats, changes=changes, source=source,
                decoder=decoder, timings=timings, rss=rss, extra=extra)
            write_json_atomic(tmp / man_final.name, manifest)
            readable(*files, tmp / man_final.name)
            bar.update(1)
            bar.close()
        move_into_place(files, out, stale=[data_final])
    finally:
        model.train(was_training)
        if dev.type != "cpu" and not release_model:
            model.to(dev)  # hand the caller's model back where it was
    return manifest


def _check_args(model: Any, precision: str, opset: int, batch_sizes: Sequence[int]) -> Any:
    """Refuse a bad precision / opset / batch list or a model without a DiT config; returns the config."""
    if precision not in PRECISIONS:
        raise DitDeployError(
            f"precision {precision!r} is not an ONNX export precision ({', '.join(PRECISIONS)}); "
            "int8 is quantized from an fp32/fp16 ONNX by ditdeploy.calibration.quantize "
            "(`ditdeploy export --precision int8`)"
        )
    if opset < MIN_OPSET:
        raise DitDeployError(f"opset {opset} < {MIN_OPSET}: LayerNormalization needs opset >= 17")
    if not batch_sizes or min(batch_sizes) < 1:
        raise DitDeployError("batch_sizes must be positive integers")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "in_channels"):
        raise DitDeployError("export_denoiser_onnx needs a ditdeploy.models.DiT (with .config)")
    return config


def _trace(model: Any, config: Any, precision: str, opset: int, fp16_policy: Any) -> tuple[Any, Any, Any, Any]:
    """Trace (fp32, or the fp16 ``HalfDiT`` view) to a cleaned ``onnx_ir`` model with metadata.

    Returns (model, cleanup changes, graph stats, fp16 policy or None)."""
    import torch

    module: Any = model
    policy = None
    if precision == "fp16":
        from ditdeploy.export.fp16 import DEFAULT_POLICY, HalfDiT

        policy = fp16_policy or DEFAULT_POLICY
        module = HalfDiT(model, policy).eval()
    n = 2  # example batch: not 1 (torch.export specialises size-1 dims)
    args = (
        torch.randn(n, config.in_channels, config.input_size, config.input_size),
        torch.tensor([1, 999][:n], dtype=torch.int64),
        torch.tensor([0, config.null_class][:n], dtype=torch.int64),
    )
    ir_model = dynamo_export(
        module, args, ("x", "t", "y"), ("out",),
        {"x": {0: "batch"}, "t": {0: "batch"}, "y": {0: "batch"}, "out": {0: "batch"}}, opset,
    )
    changes = cleanup(ir_model)
    stats = graph_stats(ir_model)
    if opset >= MIN_OPSET and "LayerNormalization" not in stats["ops"]:
        raise DitDeployError("exported graph has no LayerNormalization node (decomposed?): refusing it")
    set_metadata(ir_model, {
        "ditdeploy.kind": "denoiser",
        "ditdeploy.precision": precision,
        "ditdeploy.config": config.to_json(),
    })
    return ir_model, changes, stats, policy


def _verify(model: Any, onnx_path: Path, config: Any, precision: str, batch_sizes: Sequence[int], seed: int,
            tolerance: dict[str, float] | None, release_model: bool) -> dict[str, Any]:
    """ONNX Runtime CPU vs the fp32 torch model at each batch size; raises ``NumericsError`` beyond tolerance."""
    from ditdeploy.export.verify import check_parity, torch_reference
    from ditdeploy.proof.parity import probe_inputs

    feeds = probe_inputs(config, batch_sizes, seed)
    parity = check_parity(onnx_path, torch_reference(model), feeds, precision=precision, tolerance=tolerance,
                          what=f"{precision} ONNX",
                          after_reference=(lambda: _release(model)) if release_model else None)
    parity["reference"] = "torch-fp32"
    return parity


def _denoiser_manifest(onnx_path: Path, files: list[Path], config: Any, *, precision: str, opset: int,
                       batch_sizes: Sequence[int], batch_max: int | None, parity: dict[str, Any] | None,
                       policy: Any, stats: dict[str, Any], changes: dict[str, Any], source: dict[str, Any] | None,
                       decoder: str | None, timings: dict[str, float], rss: PeakRSS,
                       extra: dict[str, Any] | None) -> dict[str, Any]:
    """The denoiser's manifest: config, I/O, batch limits, parity, graph summary, timings and memory."""
    import torch

    from ditdeploy.artifact.manifest import make_manifest

    size, c = config.input_size, config.in_channels
    return make_manifest(
        onnx_path, files,
        kind="denoiser",
        format="onnx",
        precision=precision,
        config=dataclasses.asdict(config),
        opset=opset,
        io={"inputs": {"x": ["batch", c, size, size], "t": ["batch"], "y": ["batch"]},
            "outputs": {"out": ["batch", config.out_channels, size, size]},
            "dtypes": {"x": "float32", "t": "int64", "y": "int64", "out": "float32"}},
        batch={"min": 1, "opt": max(batch_sizes), "max": batch_max},
        parity=parity,
        verified=parity is not None,
        fp16_policy=policy.to_dict() if policy is not None else None,
        external_data=files[0].name if len(files) > 1 else None,
        graph={"nodes": stats["nodes"], "ops": stats["ops"], "cleanup": changes},
        weight_bytes=stats["initializer_bytes"],
        source=source,
        decoder=decoder,
        export_seconds=round(timings["total_s"], 3),
        timings={k: round(v, 3) for k, v in timings.items()},
        peak_rss_bytes=rss.peak,
        peak_rss_bytes_by_stage=rss.stages,
        exporter=f"torch.onnx.export(dynamo=True) torch {torch.__version__}",
        **(extra or {}),
    )
