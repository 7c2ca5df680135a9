"""The TensorRT engine build as plain data: profile, flags, metadata and the TRT 10 / 11 decisions.

Everything a build needs is decided here, without TensorRT or a GPU, so it can be tested on any machine, written as
JSON (``ditdeploy export --fmt trt --dry-run``) and recorded in the engine's manifest. ``ditdeploy.export.tensorrt``
only executes a :class:`BuildPlan` against the installed ``tensorrt`` module.

Decisions (docs/reference.md §2, TensorRT 10 -> 11 migration guide):

- Precision lives in the ONNX (strong typing): fp32 ONNX -> fp32 engine, the fp16 export -> fp16 engine, the static
  Q/DQ INT8 export (int8 symmetric activations, zero point 0) -> INT8 engine. No FP16/INT8 builder flags are ever
  set: TensorRT 11 removed them (weak typing is gone), and in TensorRT 10 they are not allowed on a strongly typed
  network.
- TensorRT 10: the network is created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; ``EXPLICIT_BATCH`` is
  deprecated and ignored since 10.0, so it is not set. TensorRT 11: networks are always strongly typed; the flag is
  deprecated and ignored, so no creation flag is set. TensorRT < 10 is refused.
- TF32 is off (TensorRT enables ``BuilderFlag.TF32`` by default; an "fp32" engine would otherwise run fp32 GEMMs
  in TF32, ~1e-3 relative error): ``trt_polygraphy`` passes ``CreateConfig(tf32=False)`` and checks the flag.
- The build runs through Polygraphy's TensorRT loaders (``trt_polygraphy``); this plan is their input, as data.
- The ONNX is parsed from its file path (``OnnxParser.parse_from_file``) so external data (XL/2) resolves.
- One optimisation profile over the batch dimension of ``x``, ``t``, ``y`` (min <= opt <= max).
- Builder optimisation level 0..5 (TensorRT's default 3), an optional timing cache file (loaded if present, saved
  after the build), an optional workspace limit.
- Features are detected with ``hasattr`` on the installed module (:meth:`TrtFeatures.detect`); a dry run without
  TensorRT plans for an assumed version (:meth:`TrtFeatures.assume`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditdeploy.artifact.manifest import Manifest
from ditdeploy.errors import ArtifactError, DitDeployError
from ditdeploy.system.bounds import MAX_BATCH

__all__ = [
    "BatchProfile",
    "BuildPlan",
    "TrtFeatures",
    "check_int8_graph",
    "engine_metadata",
    "make_build_plan",
]

PRECISIONS = ("fp32", "fp16", "int8")
OPT_LEVELS = range(0, 6)
DEFAULT_OPT_LEVEL = 3
DEFAULT_BATCH = (1, 8, 32)  # min, opt, max (the sampler's CFG batch is 2 x images; larger batches are chunked)
MAX_BATCH_LIMIT = MAX_BATCH  # one limit for every command (ditdeploy.system.bounds)
MIN_MAJOR = 10
INSTALL_HINT = ("pip install 'ditdeploy[tensorrt]' (TensorRT wheels come from NVIDIA's index: add "
                "--extra-index-url https://pypi.nvidia.com; an NVIDIA GPU and driver are required)")


def _major_minor(version: str) -> tuple[int, int]:
    nums = [int(x) for x in re.findall(r"\d+", str(version))[:2]]
    if not nums:
        raise DitDeployError(f"cannot read a TensorRT version from {version!r}")
    return nums[0], (nums[1] if len(nums) > 1 else 0)


@dataclass(frozen=True)
class TrtFeatures:
    """What the TensorRT Python API offers, found by feature detection (or assumed for a version)."""

    version: str
    major: int
    weak_typing: bool  # BuilderFlag.FP16 / INT8 exist (TRT <= 10); removed in 11
    strongly_typed_flag: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED exists (deprecated/ignored in 11)
    strongly_typed_default: bool  # every network is strongly typed (TRT >= 11)
    opt_level: bool  # IBuilderConfig.builder_optimization_level
    timing_cache: bool  # IBuilderConfig.create_timing_cache / set_timing_cache
    parse_from_file: bool  # OnnxParser.parse_from_file
    memory_pool_limit: bool  # IBuilderConfig.set_memory_pool_limit + MemoryPoolType.WORKSPACE
    detected: bool = True

    @classmethod
    def detect(cls, trt: Any) -> TrtFeatures:
        """Inspect the installed ``tensorrt`` module."""
        version = str(getattr(trt, "__version__", "0"))
        major, _ = _major_minor(version)
        bf = getattr(trt, "BuilderFlag", None)
        ncf = getattr(trt, "NetworkDefinitionCreationFlag", None)
        cfg_cls = getattr(trt, "IBuilderConfig", None)
        parser_cls = getattr(trt, "OnnxParser", None)
        weak = bf is not None and hasattr(bf, "FP16") and hasattr(bf, "INT8")
        return cls(
            version=version,
            major=major,
            weak_typing=weak,
            strongly_typed_flag=ncf is not None and hasattr(ncf, "STRONGLY_TYPED"),
            strongly_typed_default=not weak and major >= 11,
            opt_level=cfg_cls is not None and hasattr(cfg_cls, "builder_optimization_level"),
            timing_cache=cfg_cls is not None and hasattr(cfg_cls, "create_timing_cache"),
            parse_from_file=parser_cls is not None and hasattr(parser_cls, "parse_from_file"),
            memory_pool_limit=cfg_cls is not None and hasattr(cfg_cls, "set_memory_pool_limit")
            and hasattr(getattr(trt, "MemoryPoolType", None), "WORKSPACE"),
        )

    @classmethod
    def assume(cls, version: str = "10") -> TrtFeatures:
        """The documented API of TensorRT ``version`` (for dry runs where TensorRT is not installed)."""
        major, _ = _major_minor(version)
        return cls(version=str(version), major=major, weak_typing=major <= 10, strongly_typed_flag=True,
                   strongly_typed_default=major >= 11, opt_level=True, timing_cache=True, parse_from_file=True,
                   memory_pool_limit=True, detected=False)

    def network_flags(self) -> tuple[str, ...]:
        """``NetworkDefinitionCreationFlag`` members to set: STRONGLY_TYPED on 10, none on 11 (always strong)."""
        if self.major < MIN_MAJOR:
            raise DitDeployError(f"TensorRT {self.version} is too old: ditdeploy builds with TensorRT >= {MIN_MAJOR} "
                                 f"(strongly typed networks); {INSTALL_HINT}")
        if self.strongly_typed_default:
            return ()
        if not self.strongly_typed_flag:
            raise DitDeployError(f"TensorRT {self.version} has neither strong typing by default nor the "
                                 "STRONGLY_TYPED network flag: cannot build a precision-carrying ONNX faithfully")
        return ("STRONGLY_TYPED",)

    def builder_flags(self, precision: str) -> tuple[str, ...]:
        """Builder flags for ``precision``: none. Strong typing takes precision from the ONNX (FP16/INT8 flags are
        removed in 11 and not allowed with STRONGLY_TYPED in 10)."""
        if precision not in PRECISIONS:
            raise DitDeployError(f"unknown engine precision {precision!r}: choose {', '.join(PRECISIONS)}")
        return ()


@dataclass(frozen=True)
class BatchProfile:
    """The single optimisation profile over the batch dimension."""

    min: int = DEFAULT_BATCH[0]
    opt: int = DEFAULT_BATCH[1]
    max: int = DEFAULT_BATCH[2]

    def validate(self, fixed: int | None = None) -> BatchProfile:
        """Check 1 <= min <= opt <= max <= limit (and equal to ``fixed`` for a static-batch ONNX)."""
        for name, v in (("min", self.min), ("opt", self.opt), ("max", self.max)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DitDeployError(f"--{name}-batch must be a positive integer, got {v!r}")
        if not self.min <= self.opt <= self.max:
            raise DitDeployError(f"batch profile needs min <= opt <= max, got {self.min} / {self.opt} / {self.max}")
        if self.max > MAX_BATCH_LIMIT:
            raise DitDeployError(f"--max-batch {self.max} is larger than {MAX_BATCH_LIMIT}")
        if fixed is not None and not self.min == self.opt == self.max == fixed:
            raise DitDeployError(f"the ONNX has a fixed batch of {fixed}: use --min-batch/--opt-batch/--max-batch "
                                 f"{fixed} or re-export with a dynamic batch")
        return self

    def shapes(self, config: Any) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shapes of each denoiser input for a DiTConfig-like ``config``."""
        c, s = int(config.in_channels), int(config.input_size)
        out = {}
        for name in ("x", "t", "y"):
            dims = [(b, c, s, s) if name == "x" else (b,) for b in (self.min, self.opt, self.max)]
            out[name] = (dims[0], dims[1], dims[2])
        return out


@dataclass(frozen=True)
class BuildPlan:
    """Everything ``build_engine`` does, as data."""

    onnx: str
    onnx_sha256: str | None
    precision: str
    config: dict[str, Any]
    profile: BatchProfile
    opt_level: int
    timing_cache: str | None
    workspace_mb: int | None
    trt_version: str
    trt_major: int
    features_detected: bool
    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...]
    strongly_typed: bool
    calibration_sha256: str | None = None
    excluded_nodes: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def input_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        from ditdeploy.config.variants import DiTConfig

        return self.profile.shapes(DiTConfig.from_dict(self.config))

    def for_features(self, feats: TrtFeatures) -> BuildPlan:
        """The same plan with the flag decisions redone for the TensorRT actually installed."""
        return dataclasses.replace(
            self, trt_version=feats.version, trt_major=feats.major, features_detected=feats.detected,
            network_flags=feats.network_flags(), builder_flags=feats.builder_flags(self.precision),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["profile"] = dataclasses.asdict(self.profile)
        d["input_shapes"] = {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])}
                             for k, v in self.input_shapes().items()}
        for k in ("network_flags", "builder_flags", "excluded_nodes", "notes"):
            d[k] = list(d[k])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildPlan:
        d = dict(d)
        d.pop("input_shapes", None)
        d["profile"] = BatchProfile(**d["profile"])
        for k in ("network_flags", "builder_flags", "excluded_nodes", "notes"):
            d[k] = tuple(d.get(k, ()))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ArtifactError(f"build plan has unknown fields {sorted(unknown)}")
        return cls(**d)


# ------------------------------------------------------------------------------------------------ ONNX checks


def _onnx_batch_dim(model: Any) -> int | None:
    """The fixed batch size of input ``x`` (None when dynamic)."""
    for i in model.graph.input:
        if i.name == "x":
            dims = i.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                return int(dims[0].dim_value)
            return None
    raise ArtifactError("the ONNX has no input 'x': not a ditdeploy denoiser")


def check_int8_graph(model: Any) -> dict[str, int]:
    """Check an INT8 ONNX is explicit Q/DQ that TensorRT can build: QuantizeLinear/DequantizeLinear present,
    int8 zero points equal to 0 (TensorRT quantization is symmetric), no dynamic-quantization or QLinear ops.
    Returns the Q/DQ counts."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    bad_ops = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv",
               "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
    found_bad = sorted({n.op_type for n in model.graph.node if n.op_type in bad_ops})
    if found_bad:
        raise DitDeployError(f"this INT8 ONNX uses {', '.join(found_bad)} (dynamic / operator-format INT8, ONNX "
                             "Runtime CPU only): TensorRT needs the static Q/DQ export (--int8-mode static)")
    inits = {i.name: i for i in model.graph.initializer}
    q = dq = 0
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        q += n.op_type == "QuantizeLinear"
        dq += n.op_type == "DequantizeLinear"
        if len(n.input) >= 3 and n.input[2] and n.input[2] in inits:
            zp = inits[n.input[2]]
            if zp.data_type != TensorProto.INT8:
                raise DitDeployError(f"{n.name}: zero point of type {TensorProto.DataType.Name(zp.data_type)}; "
                                     "TensorRT needs int8 symmetric Q/DQ (--activations int8)")
            if np.any(numpy_helper.to_array(zp) != 0):
                raise DitDeployError(f"{n.name}: non-zero zero point; TensorRT needs symmetric quantization")
    if q == 0 or dq == 0:
        raise DitDeployError("the INT8 ONNX has no QuantizeLinear/DequantizeLinear nodes: export it with "
                             "`ditdeploy export --precision int8 --calibration calib.npz`")
    return {"QuantizeLinear": q, "DequantizeLinear": dq}


def _graph_precision(model: Any) -> str:
    from onnx import TensorProto

    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "int8"
    if any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer):
        return "fp16"
    return "fp32"


def _read_source(p: Path, manifest: dict[str, Any] | None) -> tuple[Any, Manifest]:
    """The denoiser ONNX (graph only, no weights) and its verified manifest."""
    import onnx

    if not p.exists():
        raise ArtifactError(f"no such ONNX file: {p}")
    manifest = Manifest.load(p, verify=True) if manifest is None else Manifest.of(manifest, p)
    assert manifest is not None
    if manifest.kind != "denoiser":
        raise ArtifactError(f"{p.name} is a {manifest.kind!r} artifact; engines are built from the denoiser")
    if manifest.config_dict is None:
        raise ArtifactError(f"the manifest of {p.name} has no model config: re-export the ONNX")
    return onnx.load(str(p), load_external_data=False), manifest


def _carried_precision(p: Path, model: Any, manifest: Manifest, precision: str | None) -> str:
    """The precision the ONNX carries (manifest, cross-checked against the graph); ``precision`` must agree."""
    carried = manifest.precision
    if carried not in PRECISIONS:
        raise ArtifactError(f"{p.name}'s manifest has unknown precision {carried!r}")
    graph = _graph_precision(model)
    if graph != carried:
        raise ArtifactError(f"{p.name}'s manifest says {carried} but the graph looks {graph}: re-export it")
    if precision is not None and precision != carried:
        how = {"fp16": "`ditdeploy export --fmt onnx --precision fp16`",
               "int8": "`ditdeploy export --fmt onnx --precision int8 --calibration calib.npz`",
               "fp32": "`ditdeploy export --fmt onnx`"}.get(precision, "")
        raise DitDeployError(
            f"--precision {precision} needs a {precision} ONNX (strongly typed engines take their precision from the "
            f"ONNX), but {p.name} is {carried}: export one with {how}"
        )
    return carried


def _int8_notes(model: Any, manifest: dict[str, Any]) -> list[str]:
    """Checks and notes of an explicit-quantization (Q/DQ) source."""
    counts = check_int8_graph(model)
    notes = [f"explicit quantization: {counts['QuantizeLinear']} Q / {counts['DequantizeLinear']} DQ nodes"]
    if manifest.section("int8").get("mode") == "dynamic":
        raise DitDeployError("dynamic INT8 runs on ONNX Runtime CPU only: TensorRT needs --int8-mode static")
    if manifest.source_precision == "fp32":
        notes.append("non-quantized layers of this Q/DQ graph are fp32 (quantized from the fp32 ONNX); "
                     "strong typing keeps them fp32")
    cfg = manifest.config_dict or {}
    head_dim = int(cfg.get("hidden_size", 0)) // int(cfg.get("num_heads") or 1)
    if head_dim not in (16, 32, 64):
        notes.append(f"head dim {head_dim}: TensorRT's fused INT8 attention wants 16/32/64; attention stays "
                     "unquantized in this ONNX (only the GEMMs carry Q/DQ)")
    return notes


def _resolve_profile(model: Any, manifest: Manifest, min_batch: int | None, opt_batch: int | None,
                     max_batch: int | None) -> BatchProfile:
    """Batch bounds: given ones, else (1, 8, 32) clamped to each other and to the manifest's max batch; a
    static-batch ONNX gets exactly its batch."""
    fixed = _onnx_batch_dim(model)
    lo, op, hi = DEFAULT_BATCH
    mn = min_batch if min_batch is not None else (fixed or lo)
    mx = max_batch if max_batch is not None else (fixed or max(hi, mn))
    ob = opt_batch if opt_batch is not None else (fixed or min(max(op, mn), mx))
    if manifest.max_batch and max_batch is None and fixed is None:
        mx = min(mx, manifest.max_batch)
        ob = min(ob, mx)
        mn = min(mn, ob)
    profile = BatchProfile(int(mn), int(ob), int(mx)).validate(fixed)
    if manifest.max_batch and profile.max > manifest.max_batch:
        raise DitDeployError(f"--max-batch {profile.max} exceeds the ONNX's recorded max batch {manifest.max_batch}")
    return profile


def _check_knobs(opt_level: int, workspace_mb: int | None, timing_cache: str | os.PathLike | None) -> None:
    if opt_level not in OPT_LEVELS:
        raise DitDeployError(f"--opt-level must be 0..5 (TensorRT builder optimisation level), got {opt_level}")
    if workspace_mb is not None and workspace_mb < 1:
        raise DitDeployError(f"--workspace-mb must be >= 1, got {workspace_mb}")
    if timing_cache is not None and Path(timing_cache).is_dir():
        raise DitDeployError(f"--timing-cache {timing_cache} is a directory; give a file path")


def make_build_plan(
    onnx_path: str | os.PathLike,
    manifest: dict[str, Any] | None = None,
    *,
    precision: str | None = None,
    min_batch: int | None = None,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    opt_level: int = DEFAULT_OPT_LEVEL,
    timing_cache: str | os.PathLike | None = None,
    workspace_mb: int | None = None,
    features: TrtFeatures | None = None,
) -> BuildPlan:
    """Validate the inputs and decide the build for ``onnx_path`` (its manifest is read if not given).

    ``precision`` (optional) must agree with what the ONNX carries (manifest ``precision``, cross-checked against the
    graph: Q/DQ nodes -> int8, fp16 initializers -> fp16). Unset batch bounds default to (1, 8, 32) clamped to each
    other; a static-batch ONNX must be built for exactly its batch. ``features`` defaults to TensorRT 10 assumed.
    """
    from ditdeploy.artifact.files import sha256_file

    p = Path(onnx_path)
    model, manifest = _read_source(p, manifest)
    carried = _carried_precision(p, model, manifest, precision)
    notes = _int8_notes(model, manifest) if carried == "int8" else []
    profile = _resolve_profile(model, manifest, min_batch, opt_batch, max_batch)
    _check_knobs(opt_level, workspace_mb, timing_cache)
    feats = features or TrtFeatures.assume("10")
    if not feats.detected:
        notes.append(f"planned for TensorRT {feats.version} (assumed API); flags are re-decided at build time")
    int8 = carried == "int8"
    return BuildPlan(
        onnx=p.name,
        onnx_sha256=sha256_file(p),
        precision=carried,
        config=dict(manifest["config"]),
        profile=profile,
        opt_level=int(opt_level),
        timing_cache=str(timing_cache) if timing_cache is not None else None,
        workspace_mb=int(workspace_mb) if workspace_mb is not None else None,
        trt_version=feats.version,
        trt_major=feats.major,
        features_detected=feats.detected,
        network_flags=feats.network_flags(),
        builder_flags=feats.builder_flags(carried),
        strongly_typed=True,
        calibration_sha256=manifest.calibration_sha256 if int8 else None,
        excluded_nodes=manifest.excluded_nodes if int8 else (),
        notes=tuple(notes),
    )


def engine_metadata(plan: BuildPlan, gpu_name: str | None, compute_capability: tuple[int, int] | None,
                    source_manifest: dict[str, Any], seconds: float | None = None) -> dict[str, Any]:
    """Manifest fields of a built engine (read back by ``ditdeploy.runtimes.tensorrt`` at load).

    ``tensorrt``: version, GPU name and compute capability (engines are tied to both), compatibility switches;
    plus the fields carried from the ONNX (``Manifest.derive``: model fields, calibration hash, lineage), precision,
    batch profile and the whole plan.
    """
    cfg = plan.config
    return Manifest.of(source_manifest, plan.onnx).derive(None, sha256=plan.onnx_sha256, **{
        "format": "tensorrt",
        "precision": plan.precision,
        "variant": cfg.get("variant"),
        "batch": {"min": plan.profile.min, "opt": plan.profile.opt, "max": plan.profile.max},
        "tensorrt": {
            "version": plan.trt_version,
            "gpu_name": gpu_name,
            "compute_capability": list(compute_capability) if compute_capability else None,
            "version_compatible": False,
            "hardware_compatibility_level": "none",
            "strongly_typed": plan.strongly_typed,
            "tf32": False,
            "network_flags": list(plan.network_flags),
            "builder_flags": list(plan.builder_flags),
            "builder_optimization_level": plan.opt_level,
            "timing_cache": Path(plan.timing_cache).name if plan.timing_cache else None,
            "build_seconds": round(seconds, 1) if seconds is not None else None,
        },
        "build_plan": plan.to_dict(),
    })
