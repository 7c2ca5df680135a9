"""TensorRT engine build: a thin layer that executes a :class:`~ditdeploy.export.trt_plan.BuildPlan`.

All decisions (flags per TensorRT major, profile, validation, metadata) are made in ``trt_plan`` and tested on CPU;
this module only makes the TensorRT 10 / 11 Python API calls::

    builder = trt.Builder(logger)
    network = builder.create_network(flags)           # 1 << STRONGLY_TYPED on 10, 0 on 11 (always strongly typed)
    parser = trt.OnnxParser(network, logger)
    parser.parse_from_file(onnx_path)                 # resolves external data beside the ONNX
    config = builder.create_builder_config()
    config.builder_optimization_level = N
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, bytes)   # optional
    profile = builder.create_optimization_profile(); profile.set_shape(name, min, opt, max) for x, t, y
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(blob_or_empty); config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    config.get_timing_cache().serialize() -> timing cache file

The plan file and its manifest (TensorRT version, GPU name and compute capability, precision, batch profile,
calibration hash, the build plan) are written atomically. NOT run in this project's CI: there is no GPU or TensorRT
on the development machines (see README); the plan logic is tested on CPU.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ditdeploy.artifacts import (
    atomic_dir,
    load_manifest,
    make_manifest,
    manifest_path,
    write_bytes_atomic,
    write_json_atomic,
)
from ditdeploy.errors import ArtifactError, DitDeployError, MissingDependencyError
from ditdeploy.export.trt_plan import INSTALL_HINT, BuildPlan, TrtFeatures, engine_metadata, make_build_plan

__all__ = ["build_engine", "import_tensorrt", "write_build_plan"]

PLAN_SUFFIXES = (".plan", ".engine", ".trt")


def import_tensorrt() -> Any:
    """``import tensorrt`` or a one-line error naming the extra and NVIDIA's package index."""
    try:
        import tensorrt as trt
    except ImportError as e:
        err = MissingDependencyError("tensorrt", "tensorrt", "TensorRT engine building")
        err.args = (f"TensorRT engine building needs the 'tensorrt' package: {INSTALL_HINT}",)
        raise err from e
    return trt


def write_build_plan(plan: BuildPlan, out_json: str | os.PathLike) -> Path:
    """Write the plan as JSON (what ``--dry-run`` produces)."""
    out_json = Path(out_json)
    write_json_atomic(out_json, plan.to_dict())
    return out_json


def dry_run_path(out_plan: str | os.PathLike) -> Path:
    """Where ``--dry-run`` writes the plan for engine ``out_plan``: ``x.plan`` -> ``x.buildplan.json``."""
    p = Path(out_plan)
    return p.with_name(p.stem + ".buildplan.json")


def _parse_errors(parser: Any) -> str:
    msgs = []
    for i in range(int(getattr(parser, "num_errors", 0))):
        e = parser.get_error(i)
        desc = e.desc() if callable(getattr(e, "desc", None)) else str(e)
        node = e.node_name() if callable(getattr(e, "node_name", None)) else ""
        msgs.append(f"{desc}{f' (node {node})' if node else ''}")
    return "; ".join(msgs[:3]) or "unknown parser error"


def _gpu() -> tuple[str | None, tuple[int, int] | None]:
    try:
        from ditdeploy.runtimes.tensorrt import gpu_info

        return gpu_info(0)
    except Exception:  # cuda-python missing or no device: recorded as unknown (the runtime then cannot check it)
        return None, None


def build_engine(
    onnx_path: str | os.PathLike,
    out_plan: str | os.PathLike,
    plan: BuildPlan | None = None,
    *,
    precision: str | None = None,
    min_batch: int | None = None,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    batch_max: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    opt_level: int = 3,
    workspace_mb: int | None = None,
    dry_run: bool = False,
    lint: bool = True,
    verbose: bool = False,
    verify: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Build a serialized TensorRT engine ``out_plan`` from the precision-carrying ONNX ``onnx_path``.

    Give a ready :class:`BuildPlan`, or the knobs (``min_batch``/``opt_batch``/``max_batch``, ``batch_max`` as an
    alias of ``max_batch``, ``timing_cache``, ``opt_level``, ``workspace_mb``, ``precision`` to assert) to make one.
    ``dry_run``: write the plan JSON beside ``out_plan`` (``<stem>.buildplan.json``) and return it, without
    TensorRT (planned for the installed TensorRT if present, else TensorRT 10's documented API).
    ``lint``: first run the static TensorRT-readiness lint (:mod:`ditdeploy.export.trt_lint`) and refuse (exit 1,
    nothing written) on a violation; its report goes into the dry run's result.
    Returns the engine manifest (or the plan dict on a dry run). ``verify`` is accepted for the export pipeline's
    uniform call; engine parity is checked at run time by ``ditdeploy check`` on a GPU.
    """
    src = Path(onnx_path)
    out = Path(out_plan)
    if out.suffix.lower() not in PLAN_SUFFIXES:
        raise DitDeployError(f"a TensorRT engine file should end in {', '.join(PLAN_SUFFIXES)}: got {out.name}")
    src_m = load_manifest(src, verify=True)
    assert src_m is not None
    trt = None
    if not dry_run:
        trt = import_tensorrt()
    else:
        try:
            import tensorrt as trt  # plan for the installed version when there is one
        except ImportError:
            trt = None
    feats = TrtFeatures.detect(trt) if trt is not None else TrtFeatures.assume("10")
    if plan is None:
        mx = max_batch if max_batch is not None else batch_max
        plan = make_build_plan(src, src_m, precision=precision, min_batch=min_batch, opt_batch=opt_batch,
                               max_batch=mx, opt_level=opt_level, timing_cache=timing_cache,
                               workspace_mb=workspace_mb, features=feats)
    else:
        plan = plan.for_features(feats)
    lint_report = _lint(src, progress) if lint else None
    if dry_run:
        path = write_build_plan(plan, dry_run_path(out))
        return {**plan.to_dict(), "written_to": str(path), "trt_lint": lint_report}
    assert trt is not None
    return _build(trt, feats, src, out, plan, src_m, verbose=verbose, progress=progress)


def _lint(src: Path, progress: bool) -> dict[str, Any]:
    """The static TensorRT lint of ``src``: report printed (stderr), LintError on a violation."""
    import sys

    from ditdeploy.export.trt_lint import lint_onnx, require_lint_pass

    rep = lint_onnx(src)
    if progress or not rep.passed:
        print(rep.format(), file=sys.stderr, flush=True)
    require_lint_pass(rep)
    return rep.to_dict()


def _build(trt: Any, feats: TrtFeatures, src: Path, out: Path, plan: BuildPlan, src_m: dict[str, Any], *,
           verbose: bool, progress: bool) -> dict[str, Any]:
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for f in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, f))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src.resolve())):
        raise ArtifactError(f"TensorRT could not parse {src.name}: {_parse_errors(parser)}")
    config = builder.create_builder_config()
    for f in plan.builder_flags:  # none today (strong typing); kept for future per-major decisions
        config.set_flag(getattr(trt.BuilderFlag, f))
    if plan.workspace_mb and feats.memory_pool_limit:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan.workspace_mb) << 20)
    if feats.opt_level:
        config.builder_optimization_level = int(plan.opt_level)
    profile = builder.create_optimization_profile()
    for name, (mn, op, mx) in plan.input_shapes().items():
        profile.set_shape(name, mn, op, mx)
    config.add_optimization_profile(profile)
    cache_path = Path(plan.timing_cache) if plan.timing_cache else None
    if cache_path is not None and feats.timing_cache:
        blob = cache_path.read_bytes() if cache_path.exists() else b""
        cache = config.create_timing_cache(blob)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise ArtifactError(f"timing cache {cache_path} does not match this TensorRT/GPU: delete it or pass "
                                "another --timing-cache")
    if progress:
        print(f"building TensorRT {feats.version} engine for {src.name} ({plan.precision}, batch "
              f"{plan.profile.min}/{plan.profile.opt}/{plan.profile.max}, opt level {plan.opt_level}); "
              "this takes minutes ...", flush=True)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise ArtifactError(f"TensorRT failed to build an engine from {src.name} (see the TensorRT log above)")
    gpu_name, cc = _gpu()
    fields = engine_metadata(plan, gpu_name, cc, src_m, seconds)
    mp = manifest_path(out)
    with atomic_dir([out, mp]) as tmp:
        tplan = tmp / out.name
        with open(tplan, "wb") as f:
            f.write(memoryview(serialized))
        manifest = make_manifest(out, [tplan], **fields)
        write_json_atomic(tmp / mp.name, manifest)
    if cache_path is not None and feats.timing_cache:
        tc = config.get_timing_cache()
        if tc is not None:
            write_bytes_atomic(cache_path, bytes(memoryview(tc.serialize())))
    return manifest
