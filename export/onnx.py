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
import logging
import os
import resource
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ditdeploy.errors import DitDeployError

DEFAULT_OPSET = 18
MIN_OPSET = 17  # LayerNormalization is a single op from opset 17
# Protobuf caps a serialized ModelProto at 2 GiB: above this many initializer bytes, weights go to external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**25
PRECISIONS = ("fp32", "fp16")


# --------------------------------------------------------------------------------------------------------- helpers
class PeakRSS:
    """Context manager sampling this process's resident set size; ``.peak`` bytes over the window."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._lap_peak = 0
        self.stages: dict[str, int] = {}
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss
            self.peak = max(self.peak, rss)
            self._lap_peak = max(self._lap_peak, rss)
            self._stop.wait(self.interval)

    def lap(self, name: str) -> None:
        """Record the peak since the previous lap under ``name``."""
        rss = self._proc.memory_info().rss
        self.stages[name] = max(self._lap_peak, rss)
        self.peak = max(self.peak, rss)
        self._lap_peak = rss

    def __enter__(self) -> PeakRSS:
        import psutil  # imported here, in the caller's thread: an import inside the sampler thread can deadlock
        # on the module lock when Ctrl-C interrupts the main thread mid-import

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, self._proc.memory_info().rss)


def process_peak_rss() -> int:
    """Lifetime peak RSS of this process in bytes (ru_maxrss; Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the dynamo exporter's chatter (torchvision op registration, deprecation warnings)."""
    names = ["torch.onnx", "torch.export", "torch._dynamo", "torch._export", "onnxscript", "torch.fx"]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for n, lv in levels.items():
                logging.getLogger(n).setLevel(lv)


def dynamo_export(module: Any, args: tuple, input_names: Sequence[str], output_names: Sequence[str],
                  dynamic: dict[str, dict[int, str]], opset: int) -> Any:
    """``torch.onnx.export(dynamo=True)`` + ``optimize_graph`` -> ``onnx_ir.Model``; dims named per ``dynamic``."""
    import torch

    dims: dict[str, Any] = {}
    shapes = {}
    for name in input_names:
        spec = {}
        for axis, dim_name in dynamic.get(name, {}).items():
            dims.setdefault(dim_name, torch.export.Dim(dim_name.replace("-", "_")))
            spec[axis] = dims[dim_name]
        shapes[name] = spec
    with quiet_exporter(), torch.inference_mode(False), torch.no_grad():
        try:
            prog = torch.onnx.export(
                module, args, dynamo=True, input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=shapes, opset_version=opset, optimize=False, verbose=False, report=False,
            )
            optimize_graph(prog.model)
        except Exception as e:  # the exporter's errors are long multi-page reports
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DitDeployError(f"torch.onnx.export (dynamo) failed: {first[:300]}") from e
    model = prog.model
    for v in list(model.graph.inputs) + list(model.graph.outputs):
        spec = dynamic.get(v.name, {})
        if v.shape is not None and spec:
            import onnx_ir as ir

            dims_ = list(v.shape)
            for axis, dim_name in spec.items():
                dims_[axis] = ir.SymbolicDim(dim_name)
            v.shape = ir.Shape(dims_)
    return model


def optimize_graph(model: Any) -> None:
    """onnxscript's optimizer pipeline minus its pattern-rewrite pass, in place on an ``onnx_ir.Model``.

    Constant folding (with shape inference), dead-node removal, constants lifted to initializers, duplicate
    initializers merged, common subexpressions eliminated, output/name fixes. The rewrite pass
    (``optimize=True`` in ``torch.onnx.export``) cost 10-20 CPU-s on XL/2 and removed only ~10 of ~760 nodes on S/2
    (ONNX Runtime's own optimizer ends within 9 nodes of it either way, same outputs, same speed): skipped.
    """
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import _constant_folding as cf

    passes = [
        common.InlinePass(),
        cf.FoldConstantsPass(shape_inference=True, input_size_limit=cf.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                             output_size_limit=cf.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    ]
    for p in passes:
        p(model)


def cleanup(model: Any) -> dict[str, Any]:
    """In-place graph cleanup on an ``onnx_ir.Model``; returns what changed.

    - single-operand Einsum that only permutes axes (the DiT unpatchify) -> Transpose (plainer for every backend);
    - opset 17: ``Split(num_outputs=k)`` (an opset-18 attribute the exporter's down-conversion leaves behind, which
      ORT rejects) -> ``Split`` with an explicit sizes input.
    Constant folding, shape inference, dead-node removal, CSE already ran in the exporter's optimizer.
    """
    import numpy as np
    import onnx_ir as ir

    rewrites = 0
    splits = 0
    opset = model.opset_imports.get("", DEFAULT_OPSET)
    for node in list(model.graph):
        if opset < 18 and node.op_type == "Split" and node.domain in ("", "ai.onnx") and "num_outputs" in node.attributes:
            k = int(node.attributes.pop("num_outputs").value)
            axis = int(node.attributes["axis"].value) if "axis" in node.attributes else 0
            shape = node.inputs[0].shape
            dim = shape[axis] if shape is not None else None
            if not isinstance(dim, int):
                raise DitDeployError(f"opset {opset}: cannot rewrite {node.name} (Split over a dynamic axis); "
                                     "use --opset 18")
            chunk = -(-dim // k)
            sizes = [min(chunk, dim - i * chunk) for i in range(k)]
            const = ir.Value(name=f"{node.name}_sizes", const_value=ir.tensor(np.array(sizes, dtype=np.int64)))
            model.graph.register_initializer(const)
            node.resize_inputs(2)
            node.replace_input_with(1, const)
            splits += 1
            continue
        if node.op_type == "Einsum" and node.domain in ("", "ai.onnx") and len(node.inputs) == 1:
            eq = node.attributes["equation"].value.replace(" ", "")
            if "->" not in eq or "." in eq:
                continue
            src, dst = eq.split("->")
            if sorted(src) != sorted(dst) or len(set(src)) != len(src):
                continue
            perm = [src.index(ch) for ch in dst]
            node.op_type = "Transpose"
            node.attributes.pop("equation")
            node.attributes["perm"] = ir.AttrInt64s("perm", perm)
            rewrites += 1
    out = {"einsum_to_transpose": rewrites}
    if splits:
        out["split_num_outputs_to_sizes"] = splits
    return out


def graph_stats(model: Any) -> dict[str, Any]:
    """Node count, op histogram and initializer bytes of an ``onnx_ir.Model``."""
    from collections import Counter

    ops = Counter(n.op_type for n in model.graph)
    nbytes = sum(int(v.const_value.nbytes) for v in model.graph.initializers.values() if v.const_value is not None)
    return {"nodes": sum(ops.values()), "ops": dict(sorted(ops.items())), "initializer_bytes": nbytes}


def save_model(model: Any, path: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Save an ``onnx_ir.Model``; weights in one ``<name>.data`` file (relative location) above the threshold.

    External data is written here with plain buffered writes of each tensor's memory (4 KiB-aligned offsets),
    which measured 3-4x faster than ``onnx_ir.save(external_data=...)`` (numpy ``tofile``) on this machine; the
    model's initializers are replaced by references into that file (the model is not reusable afterwards).
    Returns the files written, data file first.
    """
    import sys

    import numpy as np
    import onnx_ir as ir

    nbytes = graph_stats(model)["initializer_bytes"]
    if nbytes <= external_data_threshold:
        if sys.byteorder == "little":
            save_inline_streaming(model, path)
        else:  # pragma: no cover
            ir.save(model, path)
        return [path]
    data_name = path.name + ".data"
    if sys.byteorder != "little":  # pragma: no cover - raw ONNX data is little-endian
        ir.save(model, path, external_data=data_name, size_threshold_bytes=1024, alignment=4096)
        return [path.with_name(data_name), path]
    offset = 0
    with open(path.with_name(data_name), "wb") as f:
        for value in model.graph.initializers.values():
            t = value.const_value
            if t is None or t.nbytes < 1024 or isinstance(t, ir.ExternalTensor):
                continue
            pad = (-offset) % 4096
            if pad:
                f.write(b"\0" * pad)
                offset += pad
            arr = np.ascontiguousarray(t.numpy())
            f.write(memoryview(arr).cast("B"))
            value.const_value = ir.ExternalTensor(data_name, offset, int(t.nbytes), t.dtype, shape=t.shape,
                                                  name=value.name, base_dir=path.parent)
            offset += int(t.nbytes)
    ir.save(model, path)
    return [path.with_name(data_name), path]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_MODEL_GRAPH_TAG = b"\x3a"  # ModelProto.graph: field 7, length-delimited
_GRAPH_INIT_TAG = b"\x2a"  # GraphProto.initializer: field 5
_TENSOR_RAW_TAG = b"\x4a"  # TensorProto.raw_data: field 9


def save_inline_streaming(model: Any, path: Path) -> None:
    """Write an ``onnx_ir.Model`` as one self-contained .onnx without building the whole protobuf in memory.

    ``onnx_ir.save`` serializes every weight into a ModelProto and then into one bytes object (two extra copies
    of all weights: 3.2x the weight bytes peak for L/2). Here the model is serialized with its large initializers
    left empty, and the file is assembled in protobuf wire format: the model's other fields, then the graph field
    whose initializer entries get their ``raw_data`` field streamed straight from each tensor's memory (fields may
    appear in any order in the wire format; ``onnx.load`` yields the same ModelProto as ``onnx_ir.save``).
    """
    import numpy as np
    import onnx
    import onnx_ir as ir

    originals: dict[str, Any] = {}
    for name, v in model.graph.initializers.items():
        t = v.const_value
        if t is None or isinstance(t, ir.ExternalTensor) or t.nbytes < 1024 or t.dtype == ir.DataType.STRING:
            continue
        originals[name] = t
        v.const_value = ir.ExternalTensor("__streamed__", 0, int(t.nbytes), t.dtype, shape=t.shape, name=name)
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for name, t in originals.items():
            model.graph.initializers[name].const_value = t
    graph = proto.graph
    inits = list(graph.initializer)
    graph.ClearField("initializer")
    graph_bytes = graph.SerializeToString()
    proto.ClearField("graph")
    head = proto.SerializeToString()
    entries: list[tuple[bytes, Any, int]] = []
    for tp in inits:
        t = originals.get(tp.name) if tp.data_location == onnx.TensorProto.EXTERNAL else None
        if t is not None:
            tp.ClearField("external_data")
            tp.ClearField("data_location")
            meta = tp.SerializeToString()
            n = int(t.nbytes)
            entries.append((meta, t, len(meta) + 1 + len(_varint(n)) + n))
        else:
            meta = tp.SerializeToString()
            entries.append((meta, None, len(meta)))
    graph_len = len(graph_bytes) + sum(1 + len(_varint(size)) + size for _, _, size in entries)
    if len(head) + graph_len >= 2**31:
        raise DitDeployError("model is too large for a single .onnx file (2 GiB protobuf limit): use external data")
    with open(path, "wb") as f:
        f.write(head)
        f.write(_MODEL_GRAPH_TAG + _varint(graph_len))
        f.write(graph_bytes)
        for meta, t, size in entries:
            f.write(_GRAPH_INIT_TAG + _varint(size))
            f.write(meta)
            if t is not None:
                arr = np.ascontiguousarray(t.numpy())
                f.write(_TENSOR_RAW_TAG + _varint(arr.nbytes))
                f.write(memoryview(arr).cast("B"))


def drop_weights(model: Any) -> None:
    """Detach every initializer's data from a saved ``onnx_ir.Model`` and unpin its graph.

    onnxscript's module-level rewrite rules keep references to the last graph they matched (their matchers'
    ``_graph``, ``_current_node``, ``_match``), so the exported graph and, through the tensors it wraps, the torch
    parameters would otherwise stay alive for the life of the process.
    """
    import gc

    graph = model.graph
    for v in graph.initializers.values():
        v.const_value = None
    for v in graph.inputs:
        if getattr(v, "const_value", None) is not None:
            v.const_value = None
    for r in gc.get_referrers(graph):
        if isinstance(r, dict) and r.get("_graph") is graph:
            for k in ("_graph", "_current_node", "_match", "_tracer"):
                if k in r:
                    r[k] = None


def set_metadata(model: Any, props: dict[str, str]) -> None:
    """Add ``metadata_props`` (string key/values) and producer info to an ``onnx_ir.Model``."""
    model.metadata_props.update(props)
    model.producer_name = "ditdeploy"
    with contextlib.suppress(Exception):
        import importlib.metadata as md

        model.producer_version = md.version("ditdeploy")


def _stage_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="stage", leave=False)


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
    ``verify.TOLERANCES[precision]``). ``source`` (e.g. checkpoint path + sha256) and ``decoder`` (file name of a VAE
    decoder artifact beside it) go into the manifest, as does everything in ``extra``. ``release_model`` frees the
    model's weights (moved to the meta device: the model is unusable afterwards) once the torch reference outputs
    are computed, so the torch weights and the ONNX Runtime session are never in memory together (the CLI does
    this: peak RSS ~1.3x instead of ~2.3x the weight bytes for XL/2).
    """
    import torch

    from ditdeploy.artifacts import atomic_dir, make_manifest, manifest_path, write_json_atomic
    from ditdeploy.export.verify import TOLERANCES, check_parity, denoiser_inputs, torch_reference

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
    policy = None
    try:
        with PeakRSS() as rss, atomic_dir([data_final, out, man_final]) as tmp:
            bar = _stage_bar(4, progress, f"export {out.name}")
            module: Any = model
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
            bar.set_description(f"export {out.name}: trace + convert")
            t0 = time.perf_counter()
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
            timings["export_s"] = time.perf_counter() - t0
            rss.lap("export")
            bar.update(1)

            bar.set_description(f"export {out.name}: save")
            t0 = time.perf_counter()
            files = save_model(ir_model, tmp / out.name, external_data_threshold)
            drop_weights(ir_model)
            del ir_model, module
            timings["save_s"] = time.perf_counter() - t0
            rss.lap("save")
            bar.update(1)

            parity = None
            if verify:
                bar.set_description(f"export {out.name}: verify on ORT CPU")
                t0 = time.perf_counter()
                tol = tolerance if tolerance is not None else TOLERANCES[precision]
                feeds = denoiser_inputs(config, batch_sizes, seed)
                parity = check_parity(tmp / out.name, torch_reference(model), feeds, tolerance=tol,
                                      what=f"{precision} ONNX",
                                      after_reference=(lambda: _release(model)) if release_model else None)
                parity["reference"] = "torch-fp32"
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
            weight_bytes = stats["initializer_bytes"]
            manifest = make_manifest(
                tmp / out.name, files,
                kind="denoiser",
                format="onnx",
                precision=precision,
                config=dataclasses.asdict(config),
                opset=opset,
                io={"inputs": {"x": ["batch", config.in_channels, config.input_size, config.input_size],
                               "t": ["batch"], "y": ["batch"]},
                    "outputs": {"out": ["batch", config.out_channels, config.input_size, config.input_size]},
                    "dtypes": {"x": "float32", "t": "int64", "y": "int64", "out": "float32"}},
                batch={"min": 1, "opt": max(batch_sizes), "max": batch_max},
                parity=parity,
                verified=parity is not None,
                fp16_policy=policy.to_dict() if policy is not None else None,
                external_data=files[0].name if len(files) > 1 else None,
                graph={"nodes": stats["nodes"], "ops": stats["ops"], "cleanup": changes},
                weight_bytes=weight_bytes,
                source=source,
                decoder=decoder,
                export_seconds=round(timings["total_s"], 3),
                timings={k: round(v, 3) for k, v in timings.items()},
                peak_rss_bytes=rss.peak,
                peak_rss_bytes_by_stage=rss.stages,
                exporter=f"torch.onnx.export(dynamo=True) torch {torch.__version__}",
                **(extra or {}),
            )
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
