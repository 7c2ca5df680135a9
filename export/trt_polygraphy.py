"""A :class:`~ditdeploy.export.trt_plan.BuildPlan` translated into Polygraphy's TensorRT loaders.

The build runs through the loaders NVIDIA tests (Polygraphy, ``polygraphy.backend.trt``)::

    NetworkFromOnnxPath(onnx, strongly_typed=...)          # parse_from_file: external data resolves
    PostprocessConfig(CreateConfig(tf32=False, profiles=[], builder_optimization_level=N), checks(Profile))
    EngineFromNetwork(network, config)  ->  SaveEngine(engine, tmp path)

Two steps stay data: :func:`polygraphy_args` (plan -> plain arguments, testable without TensorRT) and
:func:`make_loaders` (arguments -> Polygraphy objects; Polygraphy imports TensorRT lazily, so these construct on a
machine without it). :class:`ConfigChecks` is the post-processing step Polygraphy does not do itself, reviewed
against Polygraphy 0.53's ``backend/trt/config.py``:

- ``CreateConfig`` calls ``add_optimization_profile`` without checking its return (-1 when TensorRT rejects the
  profile): ditdeploy passes ``profiles=[]`` and adds the profile itself (Polygraphy's ``Profile.to_trt``, which
  validates it), checking the returned index and ``config.num_optimization_profiles``;
- ``tf32=False`` makes ``CreateConfig`` clear ``BuilderFlag.TF32`` (on by default in TensorRT); the check asserts
  the flag is really off, so an fp32 engine is fp32 and not TF32 (~1e-3 error);
- the timing cache is loaded here, not through ``load_timing_cache``: ``create_timing_cache`` returning None (an
  unreadable cache) and ``set_timing_cache`` returning False (another TensorRT/GPU) are one-line errors;
- the workspace limit (``set_memory_pool_limit``) is applied here because its key is a TensorRT enum.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditdeploy.errors import ArtifactError, DitDeployError
from ditdeploy.export.trt_plan import BuildPlan

__all__ = ["ConfigChecks", "PolygraphyArgs", "make_loaders", "make_profile", "polygraphy_args"]


@dataclass(frozen=True)
class PolygraphyArgs:
    """The Polygraphy calls of a build, as data."""

    onnx: str
    strongly_typed: bool
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    tf32: bool
    builder_optimization_level: int
    timing_cache: str | None
    workspace_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def polygraphy_args(plan: BuildPlan, onnx_path: str | Path) -> PolygraphyArgs:
    """``plan`` -> the arguments of NetworkFromOnnxPath / CreateConfig / the config checks.

    Strong typing: TensorRT 10 needs ``STRONGLY_TYPED`` at network creation (``strongly_typed=True``); on 11 every
    network is strongly typed and the plan sets no flag. TF32 is always off: precision comes from the ONNX, and an
    fp32 tensor (an fp32 engine, or an fp32 island of an fp16 graph) must stay fp32.
    """
    unknown = set(plan.network_flags) - {"STRONGLY_TYPED"}
    if unknown or plan.builder_flags:
        raise DitDeployError(f"build plan asks for flags this builder does not set: "
                             f"{sorted(unknown | set(plan.builder_flags))}")
    return PolygraphyArgs(
        onnx=str(Path(onnx_path).resolve()),
        strongly_typed="STRONGLY_TYPED" in plan.network_flags,
        profile=plan.input_shapes(),
        tf32=False,
        builder_optimization_level=int(plan.opt_level),
        timing_cache=plan.timing_cache,
        workspace_bytes=int(plan.workspace_mb) << 20 if plan.workspace_mb else None,
    )


class ConfigChecks:
    """``PostprocessConfig`` step: timing cache, workspace, and the checks Polygraphy leaves out (see module doc).

    ``profile`` is the Polygraphy ``Profile`` of the plan (added here so ``add_optimization_profile``'s return is
    checked). Keeps the config it saw (``self.config``) so the caller can save the timing cache after the build.
    """

    def __init__(self, args: PolygraphyArgs, trt: Any, profile: Any = None):
        self.args, self.trt, self.profile, self.config = args, trt, profile, None

    def __call__(self, builder: Any, network: Any, config: Any) -> None:
        self.config = config
        trt_profile = self.profile.fill_defaults(network).to_trt(builder, network)  # Polygraphy validates it
        idx = config.add_optimization_profile(trt_profile)
        n = int(config.num_optimization_profiles)
        if idx < 0 or n != 1:
            raise ArtifactError(f"TensorRT did not accept the optimisation profile (add_optimization_profile "
                                f"returned {idx}, {n} profiles): check the batch bounds {self.args.profile['x']}")
        tf32 = getattr(self.trt.BuilderFlag, "TF32", None)
        if tf32 is not None and not self.args.tf32 and config.get_flag(tf32):
            raise ArtifactError("BuilderFlag.TF32 is still set: the fp32 parts of the engine would run TF32")
        if self.args.workspace_bytes:
            config.set_memory_pool_limit(self.trt.MemoryPoolType.WORKSPACE, self.args.workspace_bytes)
        if self.args.timing_cache:
            self._load_cache(config, Path(self.args.timing_cache))

    @staticmethod
    def _load_cache(config: Any, path: Path) -> None:
        blob = path.read_bytes() if path.exists() else b""
        cache = config.create_timing_cache(blob)
        if cache is None:
            raise ArtifactError(f"TensorRT could not read the timing cache {path}: delete it or pass another "
                                "--timing-cache")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise ArtifactError(f"timing cache {path} does not match this TensorRT/GPU: delete it or pass another "
                                "--timing-cache")

    def timing_cache_bytes(self) -> bytes:
        """The config's timing cache after the build, serialized (error when TensorRT returns none)."""
        cache = self.config.get_timing_cache() if self.config is not None else None
        if cache is None:
            raise ArtifactError("TensorRT returned no timing cache after the build: nothing to save")
        return bytes(memoryview(cache.serialize()))


def _polygraphy_trt() -> Any:
    from ditdeploy.errors import MissingDependencyError

    try:
        from polygraphy.backend import trt as ptrt
    except ImportError as e:
        raise MissingDependencyError("polygraphy", "tensorrt", "TensorRT engine building") from e
    if "strongly_typed" not in inspect.signature(ptrt.NetworkFromOnnxPath).parameters:
        raise DitDeployError("this Polygraphy has no strongly typed networks: pip install -U polygraphy")
    return ptrt


def make_profile(args: PolygraphyArgs) -> Any:
    """The plan's batch profile as a Polygraphy ``Profile``."""
    profile = _polygraphy_trt().Profile()
    for name, (mn, op, mx) in args.profile.items():
        profile.add(name, min=mn, opt=op, max=mx)
    return profile


def make_loaders(args: PolygraphyArgs, checks: ConfigChecks) -> tuple[Any, Any, Any]:
    """(network loader, config loader, engine loader) for ``args``; ``checks`` is the config post-processing step
    (it gets the plan's ``Profile`` here). Nothing runs until the engine loader is called."""
    ptrt = _polygraphy_trt()
    checks.profile = make_profile(args)
    network = ptrt.NetworkFromOnnxPath(args.onnx, strongly_typed=args.strongly_typed)
    config = ptrt.PostprocessConfig(
        ptrt.CreateConfig(tf32=args.tf32, profiles=[], builder_optimization_level=args.builder_optimization_level),
        checks,
    )
    return network, config, ptrt.EngineFromNetwork(network, config=config)
