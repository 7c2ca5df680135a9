"""Build plan -> Polygraphy loaders, on CPU: the arguments, and the real Polygraphy objects built from them
(Polygraphy imports TensorRT lazily, so its loaders construct here; nothing runs until a GPU build calls them).

``ConfigChecks`` runs against TensorRT's ``IBuilderConfig``, which cannot be installed here: its tests use a
stand-in exposing exactly the members the checks read (``num_optimization_profiles``, ``get_flag``,
``create_timing_cache``, ``set_timing_cache``, ``set_memory_pool_limit``, ``get_timing_cache``).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

pytest.importorskip("onnx")
ptrt = pytest.importorskip("polygraphy.backend.trt")

from test_trt_plan import TRT10, TRT11, _artifact  # noqa: E402

from ditdeploy.errors import ArtifactError, DitDeployError  # noqa: E402
from ditdeploy.export.trt_plan import TrtFeatures, make_build_plan  # noqa: E402
from ditdeploy.export.trt_polygraphy import ConfigChecks, make_loaders, polygraphy_args  # noqa: E402


@pytest.fixture
def plans(tmp_path):
    p = _artifact(tmp_path, "fp32")
    kw = {"min_batch": 2, "opt_batch": 4, "max_batch": 16, "opt_level": 5, "workspace_mb": 512,
          "timing_cache": tmp_path / "tc.cache"}
    return p, {v: make_build_plan(p, features=TrtFeatures.detect(f), **kw) for v, f in (("10", TRT10), ("11", TRT11))}


def test_plan_to_polygraphy_arguments(plans):
    p, by = plans
    a10, a11 = polygraphy_args(by["10"], p), polygraphy_args(by["11"], p)
    assert a10.strongly_typed is True and a11.strongly_typed is False  # 11: always strongly typed, no flag
    assert a10.tf32 is False and a10.builder_optimization_level == 5 and a10.workspace_bytes == 512 << 20
    assert a10.profile["x"] == ((2, 1, 8, 8), (4, 1, 8, 8), (16, 1, 8, 8)) and a10.profile["t"] == ((2,), (4,), (16,))
    assert a10.onnx == str(p.resolve()) and a10.timing_cache.endswith("tc.cache")
    assert a10.to_dict()["profile"]["y"] == ((2,), (4,), (16,))


def test_flags_this_builder_cannot_set_are_refused(plans):
    p, by = plans
    with pytest.raises(DitDeployError, match="FP16"):
        polygraphy_args(dataclasses.replace(by["10"], builder_flags=("FP16",)), p)


def test_real_polygraphy_loaders_carry_the_plan(plans):
    p, by = plans
    args = polygraphy_args(by["10"], p)
    checks = ConfigChecks(args, trt=None)
    network, config, engine = make_loaders(args, checks)
    assert isinstance(network, ptrt.NetworkFromOnnxPath) and network.path == args.onnx
    assert network.strongly_typed is True
    assert isinstance(config, ptrt.PostprocessConfig) and config._func is checks
    create = config._config
    assert isinstance(create, ptrt.CreateConfig)
    assert create.tf32 is False and create.fp16 is False and create.int8 is False and create.bf16 is False
    assert create.builder_optimization_level == 5 and create.timing_cache_path is None  # loaded by the checks
    assert create.profiles == []  # added by the checks, so add_optimization_profile's return is checked
    prof = checks.profile
    assert isinstance(prof, ptrt.Profile) and list(prof) == ["x", "t", "y"]
    assert (prof["x"].min, prof["x"].opt, prof["x"].max) == ((2, 1, 8, 8), (4, 1, 8, 8), (16, 1, 8, 8))
    assert isinstance(engine, ptrt.EngineFromNetwork)
    assert engine._network is network and engine._config is config
    assert polygraphy_args(by["11"], p).strongly_typed is False


# ----------------------------------------------------------------------------------------------- config checks

TRT_API = SimpleNamespace(BuilderFlag=SimpleNamespace(TF32="TF32"), MemoryPoolType=SimpleNamespace(WORKSPACE="WS"))


class _Profile:
    """Polygraphy's Profile surface used by the checks (``fill_defaults(network).to_trt(builder, network)``)."""

    def fill_defaults(self, network):
        return self

    def to_trt(self, builder, network):
        return "trt-profile"


class _Config:
    """The IBuilderConfig members ConfigChecks reads (see the module doc)."""

    def __init__(self, profile_index=0, tf32=False, cache_ok=True, cache_matches=True):
        self.profile_index, self.num_optimization_profiles, self.tf32 = profile_index, 0, tf32
        self.cache_ok, self.cache_matches = cache_ok, cache_matches
        self.pools, self.cache, self.profiles = {}, None, []

    def add_optimization_profile(self, profile):
        if self.profile_index >= 0:
            self.profiles.append(profile)
            self.num_optimization_profiles += 1
        return self.profile_index

    def get_flag(self, flag):
        return self.tf32 if flag == "TF32" else False

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def create_timing_cache(self, blob):
        return SimpleNamespace(blob=blob, serialize=lambda: b"cache:" + blob) if self.cache_ok else None

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        self.cache = cache
        return self.cache_matches

    def get_timing_cache(self):
        return self.cache


def _checks(plans, **cfg):
    p, by = plans
    checks = ConfigChecks(polygraphy_args(by["10"], p), TRT_API, _Profile())
    config = _Config(**cfg)
    checks(None, None, config)
    return checks, config


def test_config_checks_apply_workspace_and_timing_cache(plans, tmp_path):
    (tmp_path / "tc.cache").write_bytes(b"old")
    checks, config = _checks(plans)
    assert config.profiles == ["trt-profile"]
    assert config.pools == {"WS": 512 << 20} and config.cache.blob == b"old"
    assert checks.timing_cache_bytes() == b"cache:old"


@pytest.mark.parametrize("cfg, words", [
    ({"profile_index": -1}, "add_optimization_profile returned -1"),
    ({"tf32": True}, "TF32 is still set"),
    ({"cache_ok": False}, "could not read the timing cache"),
    ({"cache_matches": False}, "does not match this TensorRT/GPU"),
])
def test_config_checks_refuse(plans, cfg, words):
    with pytest.raises(ArtifactError, match=words):
        _checks(plans, **cfg)


def test_no_timing_cache_after_the_build_is_an_error(plans):
    p, by = plans
    checks = ConfigChecks(polygraphy_args(by["10"], p), TRT_API)
    with pytest.raises(ArtifactError, match="no timing cache"):
        checks.timing_cache_bytes()
