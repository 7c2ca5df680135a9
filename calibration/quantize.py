"""INT8 denoiser ONNX: explicit QuantizeLinear/DequantizeLinear (static, calibrated) or dynamic INT8 for CPUs.

``quantize_int8(onnx_in, onnx_out, calibration=..., mode="static")`` turns the fp32 ONNX denoiser into an explicitly
quantized (Q/DQ) graph with ``onnxruntime.quantization.quantize_static`` (QDQ format):

- weights: int8, per output channel, symmetric (zero point 0);
- activations: int8 symmetric by default (what TensorRT's explicit quantization needs: zero point 0), or uint8
  asymmetric (``activations="uint8"``, CPU runtimes; ``"auto"``: uint8 for the ``cpu-avx2`` target, where it is the
  faster form, see ``ditdeploy.system.cpu_isa.resolve_activations``); ranges from the calibration set by percentile
  (default 99.99 % of |x|) or entropy over histograms, not by plain max;
- only the GEMM inputs are quantized (Q/DQ on the activation and the weight of MatMul/Gemm/Conv, none on their
  outputs): the bias add, LayerNorm, modulation, GELU and softmax stay in floating point, and ONNX Runtime fuses
  each DQ->MatMul into ``MatMulIntegerToFloat`` (an int8 GEMM with a float output);
- sensitive nodes stay in floating point by default (``calibration.nodes``: embedders, adaLN modulation, the final
  layer, attention QK^T / AV); the excluded node names are listed in the manifest; ``exclude=`` overrides.

The activation ranges are collected here rather than by ``quantize_static``'s own calibrator: ORT's histogram
calibrators record every input/output tensor of every MatMul (the 256x256 attention maps included) for the whole
calibration set before histogramming, which does not fit in memory for XL/2, and histogram by sorting. Here only the
activation inputs of the nodes to quantize are exposed, streaming histograms are accumulated batch by batch
(``calibration.ranges``), and the resulting ranges are handed to ``quantize_static`` as its calibration cache.

External-data models (XL/2: 2.7 GB of weights) work: the graph (without its weights) is staged as a hidden temporary
file beside the source so its data resolves (ONNX and ORT refuse symlinked or hard-linked data), removed afterwards, ``quant_pre_process`` is not used (it fails on external
data, docs/reference.md §4), and the output is written with external data (``<out>.data``) when the source had it.

``mode="dynamic"``: ``quantize_dynamic`` (per-channel int8 weights, uint8 activations quantized at run time,
MatMul/Gemm with constant weights) for ONNX Runtime CPU; no calibration needed. The same node exclusions apply (ORT
renames a Gemm to ``<name>_MatMul`` when it converts it, which silently defeats a plain ``nodes_to_exclude``; both
names are passed).

An fp16 export can be the source too (what TensorRT wants: layers without Q/DQ then run in fp16 under strong
typing): its graph is converted to opset 19 (fp16 Q/DQ scales need it) and the activation scales are fp16.

The INT8 form follows the machine that runs it (``target``, ``ditdeploy.system.cpu_isa``; default ``auto`` = this CPU):
``cpu-vnni`` and ``trt`` keep full-range int8 weights; ``cpu-avx2`` (x86 without VNNI) quantizes the weights to 7 bits
(``reduce_range``, |w| <= 64) so that ONNX Runtime's AVX2/AVX-512BW u8s8 kernels, which add pairs of u8 x s8
products into saturating int16 lanes, cannot saturate (2 x 255 x 64 = 32640 <= 32767). The target and the form go
into the manifest's ``int8`` block.

Every output is checked at the end against its source on ONNX Runtime CPU (held-out validation inputs, per
timestep); the numbers go into the manifest's ``parity``.

Work budgets (issue 24 item 4, the XL/2 calibrate + INT8 export chain in 5 minutes on 2 cores): the range pass runs at
most ``max_inputs`` calibration inputs and at most :data:`RANGE_BUDGET_MACS` denoiser multiply-accumulates
(``ditdeploy.config.macs``: 32 XL/2 256 rows; all 512 for S/2 and smaller), and the check at most
:data:`CHECK_BUDGET_MACS` (16 XL/2 rows; every validation input of a small model), both balanced over timesteps; the
manifest says how many of how many were used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.artifact.files import (
    atomic_dir,
    manifest_path,
    sha256_file,
    temp_dir,
    temp_prefix,
    write_json_atomic,
)
from ditdeploy.artifact.manifest import Manifest, make_manifest
from ditdeploy.calibration.nodes import NodeRole, classify_nodes, resolve_exclusions, role_counts
from ditdeploy.config.macs import full_macs
from ditdeploy.errors import ArtifactError, DitDeployError, NumericsError, require
from ditdeploy.export.ort_fusions import ort_cpu_fusions, quiet_ort_logging
from ditdeploy.proof.parity import compare_runs, stacked_probe_inputs
from ditdeploy.system.cpu_isa import INT8_TARGETS, detect, resolve_activations, resolve_int8_target

__all__ = [
    "MODES",
    "Int8Options",
    "collect_ranges",
    "count_qdq",
    "int8_form",
    "external_data_files",
    "quantize_int8",
    "budget_rows",
    "stratified_subset",
]

MODES = ("static", "dynamic")
# work budgets of the range pass and of the check (module doc); rows rounded down to whole batches, at least one
RANGE_BUDGET_MACS = 4e12
CHECK_BUDGET_MACS = 2e12
FP16_QDQ_OPSET = 19
ACTIVATIONS = ("int8", "uint8")
METHODS = ("percentile", "entropy", "minmax")
# The check at the end (``_verify``) catches broken graphs (wrong scales, a quantized embedding), not quality: the
# int8 row of ditdeploy.proof.parity.THRESHOLDS (cosine 0.99, rel-L2 0.15: the limits `check` applies per call; the cosine
# used to be a separate 0.98 here) applied to all validation outputs as one comparison. On the trained digits model
# static int8 gives cosine 0.9998 over all validation outputs (0.994 for the worst single call, at t = 0), entropy
# ranges 0.998 (0.953 worst call); a wrong scale or a quantized embedding table falls far below.
log = logging.getLogger("ditdeploy.calibration")


@dataclasses.dataclass(frozen=True)
class Int8Options:
    """Knobs of :func:`quantize_int8` (recorded in the manifest)."""

    mode: str = "static"
    activations: str = "int8"
    calibrate_method: str = "percentile"
    percentile: float = 99.99
    per_channel: bool = True
    max_inputs: int = 512
    batch_size: int = 8
    range_macs: float | None = RANGE_BUDGET_MACS  # None: no budget (max_inputs only)
    check_macs: float | None = CHECK_BUDGET_MACS  # None: every validation input
    num_bins: int = 2048
    seed: int = 0
    quantize_outputs: bool = False  # ORT's default placement (Q/DQ on GEMM outputs too): for comparison only
    target: str = "cpu-vnni"  # a resolved INT8_TARGETS name (quantize_int8 resolves "auto")

    @property
    def reduce_range(self) -> bool:
        """7-bit weights: the form for x86 CPUs without VNNI (see the module doc)."""
        return self.target == "cpu-avx2"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise DitDeployError(f"unknown int8 mode {self.mode!r}: choose static (Q/DQ, calibrated) or dynamic")
        if self.activations not in ACTIVATIONS:
            raise DitDeployError(f"activations must be int8 (symmetric, TensorRT) or uint8 (ORT CPU), not "
                                 f"{self.activations!r}")
        if self.calibrate_method not in METHODS:
            raise DitDeployError(f"unknown calibration method {self.calibrate_method!r}: choose {', '.join(METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise DitDeployError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.max_inputs < 1 or self.batch_size < 1:
            raise DitDeployError("max_inputs and batch_size must be >= 1")
        if any(b is not None and b <= 0 for b in (self.range_macs, self.check_macs)):
            raise DitDeployError("the range and check work budgets must be > 0 (None: no budget)")
        if self.target not in INT8_TARGETS:
            raise DitDeployError(f"unknown INT8 target {self.target!r}: choose auto, {', '.join(INT8_TARGETS)}")
        if self.target == "trt" and (self.mode != "static" or self.activations != "int8"):
            raise DitDeployError("the TensorRT INT8 target is the static symmetric int8 Q/DQ: use --int8-mode static "
                                 "with int8 activations, or a CPU target (--int8-target cpu-vnni|cpu-avx2)")


def int8_form(reduce_range: bool, target: str) -> dict[str, Any]:
    """The manifest's record of an INT8 weight form: target, weight bits, and whether non-VNNI x86 CPUs saturate."""
    return {"target": target, "reduce_range": reduce_range, "weight_bits": 7 if reduce_range else 8,
            "weight_range": [-64, 64] if reduce_range else [-127, 127],
            "saturates_without_vnni": not reduce_range, "chosen_for": INT8_TARGETS[target]}


# ------------------------------------------------------------------------------------------------ graph staging


def external_data_files(model) -> list[str]:
    """Relative locations of the external data files an ``onnx.ModelProto`` (loaded without data) refers to."""
    from onnx import TensorProto

    locs: list[str] = []
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            for kv in init.external_data:
                if kv.key == "location" and kv.value not in locs:
                    locs.append(kv.value)
    return locs


def opset_of(model) -> int:
    """The default-domain opset version of a ModelProto."""
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _load_small_external(model, base_dir: Path, max_bytes: int = 1 << 20) -> None:
    """Bring external tensors of at most ``max_bytes`` (biases, scalars) into the ModelProto."""
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_tensor

    for init in model.graph.initializer:
        if init.data_location != TensorProto.EXTERNAL:
            continue
        info = {kv.key: kv.value for kv in init.external_data}
        if int(info.get("length", max_bytes + 1)) <= max_bytes:
            load_external_data_for_tensor(init, str(base_dir))
            init.data_location = TensorProto.DEFAULT
            del init.external_data[:]


@contextlib.contextmanager
def _stage(src: Path, workdir: Path, transform: Callable[[Any], Any] | None = None
           ) -> Iterator[tuple[Path, Any]]:
    """A graph-only copy of ``src`` whose external data resolves, plus its ModelProto (loaded without data).

    ONNX and ONNX Runtime only read external data from the model file's own directory and refuse symlinks and hard
    links, so the copy is a hidden temporary file beside ``src`` (removed afterwards). If that directory is not
    writable, the data files are copied into ``workdir`` instead.
    """
    import onnx

    from ditdeploy.artifact.files import safe_member

    model = onnx.load(str(src), load_external_data=False)
    if transform is not None:  # graph rewrites need the small constants they match (biases), not the weights
        _load_small_external(model, src.parent)
        model = transform(model)
    locs = external_data_files(model)
    for loc in locs:
        if not safe_member(src.parent, loc).exists():
            raise ArtifactError(f"{src.name} refers to external data {loc!r} that is missing beside it")
    if not locs:
        staged = workdir / "source.onnx"
        onnx.save(model, str(staged))
        yield staged, model
        return
    if os.access(src.parent, os.W_OK):
        fd, name = tempfile.mkstemp(prefix=temp_prefix(f"{src.stem}.int8-stage"), suffix=".onnx", dir=src.parent)
        os.close(fd)
        staged = Path(name)
        inferred = staged.with_name(staged.stem + "-inferred.onnx")  # what quantize_static writes beside it
        try:
            onnx.save(model, str(staged))
            yield staged, model
        finally:
            for p in (staged, inferred, staged.with_name(staged.stem + ".ranges.onnx")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        return
    for loc in locs:
        dst = workdir / loc
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(safe_member(src.parent, loc), dst)
    staged = workdir / "source.onnx"
    onnx.save(model, str(staged))
    yield staged, model


# ------------------------------------------------------------------------------------------------ inputs


def stratified_subset(t: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` items balanced over the distinct values of ``t`` (round-robin over shuffled groups).

    A round that cannot take one item from every group takes them from groups evenly spread over the sorted values
    of ``t`` (both ends included), not from the smallest values: 16 check rows of 25 timesteps span t = 20..960."""
    from ditdeploy.calibration.capture import select_steps

    if n >= t.shape[0]:
        return np.arange(t.shape[0])
    rng = np.random.default_rng(seed)
    groups = [rng.permutation(np.flatnonzero(t == v)) for v in np.unique(t)]
    out: list[int] = []
    depth = 0
    while len(out) < n:
        live = [g for g in groups if depth < g.shape[0]]
        left = n - len(out)
        if left < len(live):
            live = [live[int(i)] for i in select_steps(len(live), left)]
        out.extend(int(g[depth]) for g in live)
        depth += 1
    return np.sort(np.asarray(out, dtype=np.int64))


def budget_rows(available: int, macs_per_row: float, budget: float | None, batch_size: int,
                cap: int | None = None) -> int:
    """Rows that fit ``budget`` multiply-accumulates (whole batches, at least one batch), at most ``cap`` and
    ``available``; all of them with no budget."""
    n = available if cap is None else min(available, cap)
    if budget is None or macs_per_row <= 0:
        return n
    fit = int(budget // macs_per_row)
    return min(n, fit - fit % batch_size if fit >= batch_size else max(1, fit))


def _feeds(x: np.ndarray, t: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, x.shape[0], batch_size):
        yield {"x": np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32),
               "t": np.ascontiguousarray(t[i:i + batch_size], dtype=np.int64),
               "y": np.ascontiguousarray(y[i:i + batch_size], dtype=np.int64)}


def _session(path: Path, threads: int | None = None, optimize: bool = True, int8_exact: bool = False):
    from ditdeploy.runtimes.onnxruntime import make_session

    return make_session(path, threads=threads, optimize=optimize, int8_exact=int8_exact)


def collect_ranges(
    staged: Path,
    model,
    tensors: Sequence[str],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    method: str = "percentile",
    percentile: float = 99.99,
    symmetric: bool = True,
    num_bins: int = 2048,
    progress: bool = False,
) -> dict[str, tuple[float, float]]:
    """Activation ranges ``{tensor: (low, high)}`` of ``tensors`` over ``feeds``.

    ``staged`` is a graph file whose external data resolves from its directory; ``model`` its ModelProto (loaded
    without data). The tensors are added as graph outputs of a temporary copy, run batch by batch on ONNX Runtime
    CPU, and accumulated in streaming histograms (:mod:`ditdeploy.calibration.ranges`).
    """
    import onnx

    from ditdeploy.calibration.ranges import RangeHistogram

    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    existing = {o.name for o in aug.graph.output}
    types = _elem_types(model, tensors)
    for name in tensors:
        if name not in existing:
            aug.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, 1), None))
    aug_path = staged.with_name(staged.stem + ".ranges.onnx")
    onnx.save(aug, str(aug_path))
    try:
        sess = _session(aug_path)
        names = list(tensors)
        hists = {n: RangeHistogram(num_bins) for n in names}
        it: Any = feeds
        if progress:
            from tqdm import tqdm

            it = tqdm(feeds, desc="int8 ranges", unit="batch", dynamic_ncols=True)
        for feed in it:
            outs = sess.run(names, feed)
            for n, o in zip(names, outs, strict=True):
                a = np.asarray(o, dtype=np.float32)
                if not np.isfinite(a).all():
                    raise NumericsError(f"the fp32 model produced NaN/Inf in {n} on a calibration input")
                hists[n].add(a)
        del sess
    finally:
        aug_path.unlink(missing_ok=True)
    if method == "percentile":
        return {n: h.percentile(percentile, symmetric=symmetric) for n, h in hists.items()}
    if method == "entropy":
        if not symmetric:
            raise DitDeployError("entropy calibration gives symmetric ranges: use it with int8 activations")
        return {n: h.entropy() for n, h in hists.items()}
    return {n: h.minmax(symmetric=symmetric) for n, h in hists.items()}


def _elem_types(model, names: Sequence[str]) -> dict[str, int]:
    """ONNX element types of ``names`` (fp32 or fp16 activations), from value_info or graph-only shape inference."""
    import onnx

    def collect(g) -> dict[str, int]:
        return {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]
                if v.type.HasField("tensor_type")}

    types = collect(model.graph)
    if any(n not in types for n in names):
        try:
            types.update(collect(onnx.shape_inference.infer_shapes(model).graph))
        except Exception:  # inference is best effort: unknown tensors default to float
            pass
    return types


def _write_cache(path: Path, ranges: dict[str, tuple[Any, Any]], method: str,
                 types: dict[str, int] | None = None) -> Any:
    """ORT's calibration cache; each range in its tensor's float type (the quantizer derives the scale's type from
    it, and QuantizeLinear needs input and scale of one type: float16 scales for an fp16 graph)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    cm = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy,
          "minmax": CalibrationMethod.MinMax}[method]
    types = types or {}
    data = {}
    for n, (lo, hi) in ranges.items():
        dt = np.float16 if types.get(n) == 10 else np.float32  # TensorProto.FLOAT16 == 10
        data[n] = TensorData(lowest=np.array(lo, dtype=dt), highest=np.array(hi, dtype=dt))
    save_tensors_data(TensorsData(cm, data), path)
    return cm


# ------------------------------------------------------------------------------------------------ checks


def count_qdq(model) -> dict[str, int]:
    """Counts of QuantizeLinear / DequantizeLinear / integer ops in an ``onnx.ModelProto``."""
    c: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                         "ConvInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"):
            c[n.op_type] = c.get(n.op_type, 0) + 1
    return c


def _quantized_weight_nodes(model) -> set[str]:
    """Names of nodes whose weight input is fed by DequantizeLinear of an int8 initializer (static Q/DQ)."""
    inits = {i.name for i in model.graph.initializer}
    dq_of_const = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return {n.name for n in model.graph.node if any(i in dq_of_const for i in n.input)}


def _check_static_graph(model, quantized: Sequence[NodeRole], excluded: Sequence[NodeRole]) -> dict[str, Any]:
    counts = count_qdq(model)
    fed = _quantized_weight_nodes(model)
    missing = [r.name for r in quantized if r.name not in fed]
    leaked = [r.name for r in excluded if r.name in fed]
    if leaked:
        raise NumericsError(f"excluded nodes got quantized weights: {leaked[:4]}")
    if missing:
        log.warning("%d selected nodes were not quantized by onnxruntime: %s", len(missing), missing[:4])
    return {"qdq_counts": counts, "not_quantized": missing}


def _verify(src: Path, out: Path, inputs: dict[str, np.ndarray], batch_size: int,
            src_precision: str = "fp32", recorded: str | None = None) -> dict[str, Any]:
    """INT8 ``out`` vs its source on ``inputs`` (``parity.compare_runs``, all validation outputs judged as one
    comparison by the int8 row); with ``recorded`` (its description) the source's outputs are ``inputs["out"]``,
    recorded by `calibrate` from the same model, and the source is not run again."""
    from ditdeploy.calibration.report import batch_rows, curve_of, probe_batches, summarize_curve

    # int8_exact: the target's integer arithmetic (no int16 saturation even where this CPU lacks VNNI), so the gate
    # judges the artifact, not the exporting machine's kernels
    def run(s):
        return lambda f: s.run(None, f)[0]

    feeds = probe_batches(inputs["x"], inputs["t"], inputs["y"], batch_size)
    reference = batch_rows(np.asarray(inputs["out"], np.float32), batch_size) if recorded else run(_session(src))
    res = compare_runs(reference, run(_session(out, int8_exact=True)), feeds, thresholds="int8",
                       what=f"the int8 model {out.name}", against="its source over the validation outputs",
                       pooled=True, keep_outputs=True,
                       hint="exclude more nodes (--exclude default,'*fc2') or use more calibration data")
    curve = curve_of(res, inputs["t"])
    ov = curve["overall"]
    return {"reference": recorded or f"onnxruntime CPU on the {src_precision} source",
            "backend": "onnxruntime CPU int8",
            **ov, **summarize_curve(curve), "min_cosine_allowed": res.thresholds.call_cosine,
            "tolerance": res.tolerance(),
            "worst": {"rel_l2": ov["per_call_rel_l2_max"], "cosine": ov["per_call_cosine_min"]},
            "per_timestep": curve["per_timestep"]}


# ------------------------------------------------------------------------------------------------ main entry


def quantize_int8(
    onnx_in: str | os.PathLike,
    onnx_out: str | os.PathLike,
    calibration: str | os.PathLike | None = None,
    *,
    mode: str = "static",
    exclude: Sequence[str] | None = None,
    activations: str = "int8",
    calibrate_method: str = "percentile",
    percentile: float = 99.99,
    per_channel: bool = True,
    ort_fusions: bool | None = None,
    quantize_outputs: bool = False,
    target: str | None = "auto",
    max_inputs: int = 512,
    batch_size: int = 8,
    range_macs: float | None = RANGE_BUDGET_MACS,
    check_macs: float | None = CHECK_BUDGET_MACS,
    verify: bool = True,
    progress: bool = True,
    log_fn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Quantize the fp32 denoiser ONNX ``onnx_in`` to INT8 at ``onnx_out`` (+ manifest); returns the manifest.

    ``mode="static"`` needs ``calibration`` (an .npz from ``ditdeploy calibrate``) and writes explicit Q/DQ
    (TensorRT-ready with the default ``activations="int8"``); ``mode="dynamic"`` needs none (ORT CPU only).
    ``exclude``: see :func:`ditdeploy.calibration.nodes.resolve_exclusions` (None = embedders, adaLN, final layer,
    attention). At most ``max_inputs`` calibration inputs (balanced over timesteps) and ``range_macs`` denoiser
    multiply-accumulates are used for the ranges, at most ``check_macs`` for the check (None: no budget; module doc).
    ``verify`` compares the result with the source on ONNX Runtime CPU and records ``parity``.
    ``ort_fusions``: fuse GELU into ONNX Runtime's ``FastGelu`` first (faster on CPU; a ``com.microsoft`` op that
    ONNX Runtime and OpenVINO read, TensorRT does not). None (default): on for the CPU-only artifacts (dynamic, or
    uint8 activations), off for the TensorRT-ready static int8 Q/DQ, where asking for it is an error.
    ``target``: the machine the artifact is for (``auto`` = this CPU, ``cpu-vnni``, ``cpu-avx2``, ``trt``); it picks
    the weight form (module doc) and is recorded in the manifest.
    """
    target = resolve_int8_target(target)
    opts = Int8Options(mode=mode, activations=resolve_activations(activations, target, mode),
                       calibrate_method=calibrate_method, percentile=percentile,
                       per_channel=per_channel, max_inputs=max_inputs, batch_size=batch_size,
                       range_macs=range_macs, check_macs=check_macs,
                       quantize_outputs=quantize_outputs, target=target)
    ort_fusions = _resolve_fusions(opts, ort_fusions)
    say = log_fn or (lambda s: log.info(s))
    say(f"int8 target {opts.target} ({'7-bit weights, reduce_range' if opts.reduce_range else 'full-range int8 weights'}"
        f"); this CPU: {detect().label()}")
    onnx = require("onnx", "export", "INT8 quantization")
    require("onnxruntime.quantization", "export", "INT8 quantization")
    src, out = Path(onnx_in), Path(onnx_out)
    src_m, cfg = _check_source(src, out)
    calib = _load_calib(calibration, cfg, src, opts)
    t_start = time.perf_counter()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DitDeployError(f"cannot create output directory {out.parent}: {e.strerror}") from e
    with temp_dir(out.parent, "int8") as work_s, \
            contextlib.ExitStack() as stack:
        work = Path(work_s)
        fusions: dict[str, int] = {}
        opset_change: dict[str, int] = {}
        fp16_src = src_m.precision == "fp16"
        transform = _transform(fp16_src, ort_fusions, fusions, opset_change)
        staged, model = stack.enter_context(_stage(src, work, transform if (ort_fusions or fp16_src) else None))
        ext = bool(external_data_files(model))
        quantized, excluded, how = _select_nodes(model, exclude, opts.mode, say)
        fields: dict[str, Any] = {}
        tmp_q = work / out.name
        with quiet_ort_logging():
            if opts.mode == "static":
                assert calib is not None
                fields.update(_static(staged, model, tmp_q, work, calib, quantized, excluded, opts, ext, progress,
                                      say, full_macs(cfg)))
            else:
                _dynamic(staged, tmp_q, quantized, excluded, opts, ext)
        qmodel = onnx.load(str(tmp_q), load_external_data=False)
        fields["graph_check"] = (_check_static_graph(qmodel, quantized, excluded) if opts.mode == "static"
                                 else {"qdq_counts": count_qdq(qmodel)})
        t_quant = time.perf_counter() - t_start
        if verify:
            fields["parity"] = _parity_fields(staged, tmp_q, calib, cfg, opts, src_m.precision, say,
                                              _recorded_reference(calib, src, src_m))
        data_name = out.name + ".data"
        files = [tmp_q] + ([work / data_name] if (work / data_name).exists() else [])
        fields.update(
            format="onnx",
            precision="int8",
            int8=_int8_record(opts, quantized, excluded, how, (work / data_name).exists(), ort_fusions, fusions,
                              t_quant),
            excluded_nodes=[r.name for r in excluded],
            **({"opset": opset_change["to"], "opset_converted_from": opset_change["from"]} if opset_change else {}),
            excluded_modules=sorted({r.module for r in excluded if r.module}),
        )
        if calib is not None:
            fields.update(_calibration_record(calib))
        return _publish(out, files, tmp_q, src_m.derive(out, sha256=sha256_file(src), **fields))


def _resolve_fusions(opts: Int8Options, ort_fusions: bool | None) -> bool:
    """Validate ``opts``; ORT CPU fusions default on for the CPU-only artifacts and are refused on TensorRT Q/DQ."""
    opts.validate()
    if ort_fusions is None:
        ort_fusions = opts.mode == "dynamic" or opts.activations == "uint8"
    if ort_fusions and opts.mode == "static" and opts.activations == "int8":
        raise DitDeployError("ORT fusions make an ONNX Runtime-only graph: use them with --int8-mode dynamic or "
                             "uint8 activations, not with the TensorRT-ready int8 Q/DQ")
    return ort_fusions


def _check_source(src: Path, out: Path) -> tuple[dict[str, Any], Any]:
    """The fp32/fp16 denoiser source's manifest and config; refuses a bad source or output name."""
    if not src.exists():
        raise ArtifactError(f"no such ONNX file: {src}")
    if out.suffix.lower() != ".onnx":
        raise DitDeployError(f"the INT8 model is an ONNX file: {out.name} should end in .onnx")
    if out.resolve() == src.resolve():
        raise DitDeployError("the INT8 output must not overwrite its fp32 source")
    src_m = Manifest.load(src, verify=True)
    assert src_m is not None
    if src_m.kind != "denoiser":
        raise ArtifactError(f"{src.name} is a {src_m.kind!r} artifact; INT8 applies to the denoiser")
    if src_m.precision == "int8":
        raise DitDeployError(f"{src.name} is already INT8: quantize the fp32 export")
    return src_m, src_m.config


def _load_calib(calibration: str | os.PathLike | None, cfg: Any, src: Path, opts: Int8Options):
    """The calibration set (checked against the model's config), or None where the mode needs none."""
    if calibration is None:
        if opts.mode == "static":
            raise DitDeployError("static INT8 needs a calibration set: pass --calibration calib.npz "
                                 "(from `ditdeploy calibrate`) or use --int8-mode dynamic")
        return None
    from ditdeploy.calibration.capture import check_for_model, load_calibration

    calib = load_calibration(calibration)
    check_for_model(calib, cfg)  # config, shapes, dtypes, t/y ranges, finite: the set named as the culprit
    return calib


def _transform(fp16_src: bool, ort_fusions: bool, fusions: dict[str, int], opset_change: dict[str, int]):
    """The graph transform applied while staging: opset >= 19 for fp16 Q/DQ scales, ORT CPU fusions if asked."""

    def transform(m):
        if fp16_src and opset_of(m) < FP16_QDQ_OPSET:
            # fp16 scales on QuantizeLinear/DequantizeLinear need opset >= 19 (18 allows float32 only)
            import onnx.version_converter

            opset_change.update({"from": opset_of(m), "to": FP16_QDQ_OPSET})
            m = onnx.version_converter.convert_version(m, FP16_QDQ_OPSET)
        if ort_fusions:
            m, counts = ort_cpu_fusions(m)
            fusions.update(counts)
        return m

    return transform


def _select_nodes(model, exclude: Sequence[str] | None, mode: str, say: Callable[[str], None]
                  ) -> tuple[list[NodeRole], list[NodeRole], list[str]]:
    """The nodes to quantize and to keep in float (dynamic INT8 skips activation x activation and Conv)."""
    roles = classify_nodes(model)
    quantized, excluded = resolve_exclusions(roles, exclude)
    if mode == "dynamic":  # dynamic int8 needs a constant weight: activation x activation stays float
        skipped = [r for r in quantized if r.weight is None or r.op_type == "Conv"]
        quantized = [r for r in quantized if r not in skipped]
        excluded = excluded + skipped
    if not quantized:
        raise DitDeployError("nothing to quantize: every MatMul/Gemm/Conv is excluded")
    how = sorted({r.how for r in roles})
    say(f"int8 {mode}: {len(quantized)} nodes quantized ({role_counts(quantized)}), "
        f"{len(excluded)} kept in float ({role_counts(excluded)}); roles from {'+'.join(how)}")
    return quantized, excluded, how


def _recorded_reference(calib, src: Path, src_m: Manifest) -> str | None:
    """The description of the fp32 outputs `calibrate` recorded on the validation inputs, when they come from this
    very model (the calibration source's sha256 is the source graph's or its checkpoint's); else None."""
    if calib is None or calib.val is None or "out" not in calib.val or src_m.precision != "fp32":
        return None
    cs = calib.manifest.section("source")
    want = cs.get("sha256")
    same = {sha256_file(src), src_m.source_checkpoint().get("checkpoint_sha256"),
            (src_m.get("source_checkpoint") or {}).get("sha256")}
    if not want or want not in same:
        return None
    return (f"fp32 outputs recorded by `calibrate` on {cs.get('backend', 'the source')} from the same weights "
            f"({cs.get('path', 'source')}, sha256 {str(want)[:12]})")


def _parity_fields(staged: Path, tmp_q: Path, calib, cfg: Any, opts: Int8Options, src_precision: str,
                   say: Callable[[str], None], recorded: str | None = None) -> dict[str, Any]:
    """INT8 vs its float source on held-out (or calibration, or synthetic) inputs, for the manifest's ``parity``."""
    if calib is not None and calib.val is not None:
        vin = calib.val
        vsrc = "calibration set's held-out validation inputs"
        n_val = len(vin["x"])
        n = budget_rows(n_val, full_macs(cfg), opts.check_macs, opts.batch_size)
        if n < n_val:
            idx = stratified_subset(vin["t"], n, seed=opts.seed)
            vin = {k: v[idx] for k, v in vin.items()}
            vsrc = (f"{n} of the calibration set's {n_val} held-out validation inputs (balanced over timesteps: the "
                    f"check's work budget, {opts.check_macs / 1e12:g} T MACs)")
    elif calib is not None:
        idx = stratified_subset(calib.t, 32, seed=1)
        vin = {"x": calib.x[idx], "t": calib.t[idx], "y": calib.y[idx]}
        vsrc = "32 calibration inputs (the set has no validation part)"
    else:
        vin = stacked_probe_inputs(cfg, 16)
        vsrc = "16 synthetic inputs (x ~ N(0,1), t spread over 0..999)"
    recorded = recorded if "out" in vin and calib is not None and calib.val is not None else None
    p = {"inputs_from": vsrc, **_verify(staged, tmp_q, vin, opts.batch_size, src_precision, recorded)}
    say(f"int8 vs fp32 on {p['inputs']} inputs: cosine {p['cosine']:.6f} (per call min "
        f"{p['per_call_cosine_min']:.6f}), rel-L2 {p['rel_l2']:.4f}")
    return p


def _int8_record(opts: Int8Options, quantized: Sequence[NodeRole], excluded: Sequence[NodeRole], how: list[str],
                 external: bool, ort_fusions: bool, fusions: dict[str, int], seconds: float) -> dict[str, Any]:
    """The manifest's ``int8`` block: how the graph was quantized and where it runs."""
    static = opts.mode == "static"
    if static:
        acts = "int8 symmetric (zero point 0)" if opts.activations == "int8" else "uint8 asymmetric"
    else:
        acts = "uint8 asymmetric, quantized at run time"
    bits = "7-bit range (reduce_range) " if opts.reduce_range else ""
    return {
        "mode": opts.mode,
        "format": "QDQ" if static else "dynamic (MatMulInteger)",
        "weights": f"int8 {bits}symmetric, per {'output channel' if opts.per_channel else 'tensor'}",
        **int8_form(opts.reduce_range, opts.target),
        "activations": acts,
        "calibrate_method": opts.calibrate_method if static else None,
        "percentile": opts.percentile if static and opts.calibrate_method == "percentile" else None,
        "quantizer": f"onnxruntime.quantization.quantize_{opts.mode}",
        "quantized_nodes": len(quantized),
        "quantized_roles": role_counts(quantized),
        "excluded_roles": role_counts(excluded),
        "roles_from": "+".join(how),
        "external_data": external,
        "tensorrt_compatible": static and opts.activations == "int8" and not ort_fusions,
        "ort_fusions": fusions or None,
        "gemm_outputs_quantized": opts.quantize_outputs,
        "runtimes": (["onnxruntime", "openvino"] if (ort_fusions or opts.mode == "dynamic")
                     else ["onnxruntime", "tensorrt", "openvino"]),
        "seconds": round(seconds, 2),
    }


def _calibration_record(calib) -> dict[str, Any]:
    """The manifest's record of the calibration set used (file, size, sampler, seed, sha256)."""
    return {"calibration_sha256": calib.sha256,
            "calibration": {"file": calib.path.name, "inputs": len(calib), "timesteps": calib.num_timesteps,
                            "sampler": calib.manifest.get("sampler"), "seed": calib.manifest.get("seed")}}


def _publish(out: Path, files: list[Path], tmp_q: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Model (+ external data) and manifest renamed in together; returns the manifest."""
    mp = manifest_path(out)
    finals = [out.parent / f.name for f in files if f != tmp_q] + [out, mp]
    with atomic_dir(finals) as tmp:
        for f in files:
            shutil.move(str(f), str(tmp / f.name))
        manifest = make_manifest(out, [tmp / f.name for f in files], **fields)
        write_json_atomic(tmp / mp.name, manifest)
    return manifest


def _static(staged: Path, model, tmp_q: Path, work: Path, calib, quantized: Sequence[NodeRole],
            excluded: Sequence[NodeRole], opts: Int8Options, ext: bool, progress: bool,
            say: Callable[[str], None], row_macs: float) -> dict[str, Any]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    inits = {i.name for i in model.graph.initializer}
    const_like = set(inits)
    by_name = {n.name: n for n in model.graph.node}
    tensors: list[str] = []
    for r in quantized:
        for i in by_name[r.name].input[:2]:
            if i and i not in const_like and i != r.weight and i not in tensors:
                tensors.append(i)
        if opts.quantize_outputs:
            tensors.extend(o for o in by_name[r.name].output if o not in tensors)
    n_rows = budget_rows(len(calib), row_macs, opts.range_macs, opts.batch_size, opts.max_inputs)
    idx = stratified_subset(calib.t, n_rows, seed=opts.seed)
    feeds = list(_feeds(calib.x[idx], calib.t[idx], calib.y[idx], opts.batch_size))
    symmetric = opts.activations == "int8"
    t0 = time.perf_counter()
    ranges = collect_ranges(staged, model, tensors, feeds, method=opts.calibrate_method, percentile=opts.percentile,
                            symmetric=symmetric, num_bins=opts.num_bins, progress=progress)
    t_ranges = time.perf_counter() - t0
    say(f"activation ranges of {len(tensors)} tensors from {idx.shape[0]} of {len(calib)} calibration inputs "
        f"({opts.calibrate_method}) in {t_ranges:.1f} s")
    cache = work / "ranges.json"
    method = _write_cache(cache, ranges, opts.calibrate_method, _elem_types(model, tensors))
    op_types = sorted({r.op_type for r in quantized})
    extra: dict[str, Any] = {"ActivationSymmetric": symmetric, "WeightSymmetric": True}
    if not opts.quantize_outputs:
        # Q/DQ on GEMM inputs only: outputs stay float (bias add, residuals, LayerNorm); ORT then fuses
        # DQ->MatMul into MatMulIntegerToFloat, TensorRT fuses DQ->GEMM->bias.
        extra["OpTypesToExcludeOutputQuantization"] = op_types
    quantize_static(
        str(staged), str(tmp_q),
        calibration_data_reader=None,
        calibration_cache_path=str(cache),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=op_types,
        per_channel=opts.per_channel,
        reduce_range=opts.reduce_range,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_quantize=[r.name for r in quantized],
        nodes_to_exclude=[r.name for r in excluded],
        use_external_data_format=ext,
        calibrate_method=method,
        extra_options=extra,
    )
    amax = {n: float(max(abs(float(lo)), abs(float(hi)))) for n, (lo, hi) in ranges.items()}
    return {"ranges": {"tensors": len(tensors), "inputs": int(idx.shape[0]), "of": len(calib),
                       "budget_macs": opts.range_macs, "seconds": round(t_ranges, 2),
                       "amax_max": max(amax.values()) if amax else 0.0,
                       "amax_median": float(np.median(list(amax.values()))) if amax else 0.0}}


def _dynamic(staged: Path, tmp_q: Path, quantized: Sequence[NodeRole], excluded: Sequence[NodeRole],
             opts: Int8Options, ext: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def both(names: list[str]) -> list[str]:  # ORT renames a Gemm it converts to MatMul: <name>_MatMul
        return names + [n + "_MatMul" for n in names]

    quantize_dynamic(
        str(staged), str(tmp_q),
        op_types_to_quantize=sorted({r.op_type for r in quantized}),
        per_channel=opts.per_channel,
        reduce_range=opts.reduce_range,
        weight_type=QuantType.QInt8,
        nodes_to_quantize=both([r.name for r in quantized]),
        nodes_to_exclude=both([r.name for r in excluded]),
        use_external_data_format=ext,
        extra_options={"MatMulConstBOnly": True},
    )
