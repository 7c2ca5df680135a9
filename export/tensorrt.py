"""TensorRT engine build: a thin layer that executes a :class:`~ditdeploy.export.trt_plan.BuildPlan`.

All decisions (flags per TensorRT major, profile, validation, metadata) are made in ``trt_plan`` and tested on CPU;
the plan is translated into Polygraphy's TensorRT loaders by ``trt_polygraphy`` (``NetworkFromOnnxPath`` with
``strongly_typed``, ``CreateConfig(tf32=False, profiles=...)`` + checks, ``EngineFromNetwork``, ``SaveEngine``) and
run here. Before any of that the static lint (``trt_lint``) must pass.

The plan file and its manifest (TensorRT version, GPU name and compute capability, precision, batch profile,
calibration hash, the build plan) are written atomically, the timing cache after them. NOT run in this project's
CI: there is no GPU or TensorRT on the development machines (see docs/tensorrt.md); the plan, its Polygraphy
translation and the lint are tested on CPU.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ditdeploy.artifact.files import atomic_dir, manifest_path, write_bytes_atomic, write_json_atomic
from ditdeploy.artifact.manifest import load_manifest, make_manifest
from ditdeploy.errors import ArtifactError, DitDeployError, MissingDependencyError
from ditdeploy.export.trt_plan import INSTALL_HINT, BuildPlan, TrtFeatures, engine_metadata, make_build_plan
from ditdeploy.export.trt_polygraphy import ConfigChecks, make_loaders, polygraphy_args

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
    """Run the plan through Polygraphy's loaders; write engine + manifest atomically, then the timing cache."""
    from polygraphy.backend.trt import SaveEngine
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.VERBOSE if verbose else G_LOGGER.WARNING
    args = polygraphy_args(plan, src)
    checks = ConfigChecks(args, trt)
    _, _, engine_loader = make_loaders(args, checks)
    if progress:
        print(f"building TensorRT {feats.version} engine for {src.name} ({plan.precision}, batch "
              f"{plan.profile.min}/{plan.profile.opt}/{plan.profile.max}, opt level {plan.opt_level}, TF32 off); "
              "this takes minutes ...", flush=True)
    mp = manifest_path(out)
    t0 = time.perf_counter()
    with atomic_dir([out, mp]) as tmp:
        try:
            engine = engine_loader()
            SaveEngine(engine, str(tmp / out.name))()
        except PolygraphyException as e:  # parser errors, invalid engine: Polygraphy's message, one line
            raise ArtifactError(f"TensorRT could not build {src.name}: {' '.join(str(e).split())[:400]}") from e
        seconds = time.perf_counter() - t0
        check_engine_profile(engine, plan)
        gpu_name, cc = _gpu()
        manifest = make_manifest(out, [tmp / out.name], **engine_metadata(plan, gpu_name, cc, src_m, seconds))
        write_json_atomic(tmp / mp.name, manifest)
    from ditdeploy.artifact.trust import record_trusted

    record_trusted(manifest["files"][out.name]["sha256"], out, "tensorrt")  # built here (ditdeploy.artifact.trust)
    if plan.timing_cache:
        write_bytes_atomic(Path(plan.timing_cache), checks.timing_cache_bytes())
    return manifest


def check_engine_profile(engine: Any, plan: BuildPlan) -> None:
    """The built engine's profile 0 must be the plan's (min, opt, max) shapes for every input."""
    for name, want in plan.input_shapes().items():
        got = tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, 0))
        if got != tuple(want):
            raise ArtifactError(f"the built engine's profile for {name!r} is {got}, the plan asked for {want}")
