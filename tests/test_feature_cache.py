"""Feature reuse across steps: torch full/light steps, the sampler's cache schedule, the two-graph ONNX/OpenVINO
export verified against torch, and one-line errors for bad cache inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_export import tiny_model

from ditdeploy.config.macs import full_macs, light_macs
from ditdeploy.diffusion import sample
from ditdeploy.errors import ArtifactError, DitDeployError
from ditdeploy.export.cache_graphs import export_cache_graphs, light_path
from ditdeploy.feature_cache import forward_from_cache, forward_with_cache
from ditdeploy.proof.distances import rel_l2
from ditdeploy.runtimes import Timed, load
from ditdeploy.runtimes.torch import TorchDenoiser

K = 10


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def noise():
    rng = np.random.default_rng(5)
    return rng.standard_normal((3, 4, 8, 8)).astype(np.float32), np.array([1, 7, 3])


def _inputs(cfg, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    return x, torch.tensor([999, 500, 3][:n]), torch.tensor([0, K, 4][:n])


def test_full_step_is_the_model_and_light_step_reproduces_it(model):
    x, t, y = _inputs(model.config)
    with torch.inference_mode():
        ref = model(x, t, y)
        out, cache = forward_with_cache(model, x, t, y)
        light = forward_from_cache(model, x, t, y, cache)
        x2 = x + 0.3 * torch.randn_like(x)
        moved = forward_from_cache(model, x2, torch.tensor([700, 300, 10]), y, cache)
        ref2 = model(x2, torch.tensor([700, 300, 10]), y)
    assert torch.equal(out, ref)  # same operations in the same order: bit-identical
    assert cache.shape == (3, 2 * model.config.depth, 16, model.config.hidden_size)
    assert rel_l2(light.numpy(), ref.numpy()) < 1e-5  # only the residual sum is reassociated
    # the light step really uses the current x and t (differs from the stale output) and is only an approximation
    assert rel_l2(moved.numpy(), ref.numpy()) > 1e-2 and rel_l2(moved.numpy(), ref2.numpy()) > 1e-4


def test_mac_counts():
    from ditdeploy.config.variants import variant_config

    xl = variant_config("XL/2", 256)
    assert full_macs(xl) / 1e9 == pytest.approx(118.6, abs=0.1)  # DiT paper: 118.6 GFLOPs (multiply-adds)
    assert light_macs(xl) / full_macs(xl) < 1e-3


@pytest.mark.parametrize("method", ["ddim", "dpm-solver++"])
def test_cache_interval_1_equals_uncached_and_2_halves_full_rows(model, noise, method):
    den = TorchDenoiser.from_model(model)
    x, y = noise
    kw = dict(method=method, steps=10, cfg_scale=4.0, num_classes=K)
    plain = sample(den, x, y, **kw)
    one = Timed(den)
    cached1 = sample(one, x, y, cache_interval=1, **kw)
    assert np.abs(cached1 - plain).max() <= 1e-5 and one.light_calls == 0
    two = Timed(den)
    cached2 = sample(two, x, y, cache_interval=2, **kw)
    assert (two.calls, two.light_calls, two.rows, two.light_rows) == (10, 5, 60, 30)
    err = rel_l2(cached2, plain)
    assert 1e-5 < err < 0.5, err  # an approximation of the same trajectory, not another one


def test_cache_with_guidance_interval_runs_full_when_rows_cannot_be_served(model, noise):
    den = Timed(TorchDenoiser.from_model(model))
    x, y = noise
    # ddim 10: t = 900..0 (steps 0..9); guided (6 rows) at t 600..300 = steps 3..6, conditional-only (3 rows) else
    sample(den, x, y, steps=10, cfg_scale=4.0, num_classes=K, cfg_interval=(300, 600), cache_interval=2)
    # full at even steps; step 1 light; step 3 (6 rows) follows a 3-row full step -> full; step 5 light (6 from 6);
    # step 7 light (3 rows from the 6-row cache's cond prefix); step 9 light
    assert den.light_calls == 4 and den.calls == 10
    assert den.rows == 3 * 6 + 6 * 4 and den.light_rows == 3 + 6 + 3 + 3


def test_bad_cache_intervals(model, noise):
    x, y = noise
    den = TorchDenoiser.from_model(model)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(DitDeployError, match="cache interval must be an integer >= 1"):
            sample(den, x, y, steps=2, cache_interval=bad)

    def plain(x, t, y):
        return np.zeros((x.shape[0], 8, 8, 8), np.float32)

    with pytest.raises(DitDeployError, match="cannot reuse features"):
        sample(plain, x, y, steps=2, cache_interval=2)


@pytest.fixture(scope="module")
def pair(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    man = export_cache_graphs(model, d / "tiny.onnx")
    return d / "tiny.onnx", man


def test_both_graphs_verified_against_torch_at_export(pair, model):
    path, man = pair
    cg = man["cache_graphs"]
    assert set(man["files"]) == {"tiny.onnx", "tiny.light.onnx"} and cg["light"] == "tiny.light.onnx"
    for k in ("full_out", "full_cache", "light_out"):
        assert cg["parity"]["worst"][k]["rel_l2"] < 1e-5, k  # fp32: kernel reassociation only
    # independently: ORT on the written files vs torch on fresh inputs
    den = load(path)
    assert den.supports_cache
    x, t, y = _inputs(model.config, seed=9)
    out, cache = den.forward_full(x.numpy(), t.numpy(), y.numpy())
    light = den.forward_light(x.numpy() * 0.5, t.numpy(), y.numpy(), cache)
    with torch.inference_mode():
        r_out, r_cache = forward_with_cache(model, x, t, y)
        r_light = forward_from_cache(model, x * 0.5, t, y, r_cache)
    assert rel_l2(out, r_out.numpy()) < 1e-5 and rel_l2(cache, r_cache.numpy()) < 1e-5
    assert rel_l2(light, r_light.numpy()) < 1e-5


def test_ort_cached_sampling_matches_torch_and_uncached(pair, model, noise):
    den = load(pair[0])
    x, y = noise
    kw = dict(steps=10, cfg_scale=4.0, num_classes=K)
    plain = sample(den, x, y, **kw)
    assert np.abs(sample(den, x, y, cache_interval=1, **kw) - plain).max() <= 1e-5
    ort3 = sample(den, x, y, cache_interval=3, **kw)
    torch3 = sample(TorchDenoiser.from_model(model), x, y, cache_interval=3, **kw)
    assert rel_l2(ort3, torch3) < 1e-4


def test_openvino_pair(pair, model, noise, tmp_path):
    pytest.importorskip("openvino")
    from ditdeploy.export.cache_graphs import export_cache_graphs_openvino

    man = export_cache_graphs_openvino(pair[0], tmp_path / "tiny.xml")
    assert set(man["files"]) == {"tiny.xml", "tiny.bin", "tiny.light.xml", "tiny.light.bin"}
    for k in ("full_out", "full_cache", "light_out"):
        assert man["cache_graphs"]["parity"][k]["rel_l2"] < 1e-5, k
    den = load(tmp_path / "tiny.xml")
    x, y = noise
    kw = dict(steps=10, cfg_scale=4.0, num_classes=K, cache_interval=2)
    assert rel_l2(sample(den, x, y, **kw), sample(TorchDenoiser.from_model(model), x, y, **kw)) < 1e-4


def _copy_pair(pair, dst):
    for f in pair[0].parent.iterdir():
        shutil.copy(f, dst / f.name)
    return dst / pair[0].name


def test_missing_light_graph_is_one_line(pair, tmp_path):
    p = _copy_pair(pair, tmp_path)
    light_path(p).unlink()
    for verify in (True, False):
        with pytest.raises(ArtifactError) as e:
            load(p, verify=verify)
        assert "tiny.light.onnx" in str(e.value) and "missing" in str(e.value) and "\n" not in str(e.value)


def test_light_graph_from_another_export_is_refused(pair, tmp_path):
    import onnx

    from ditdeploy.artifact.files import sha256_file

    p = _copy_pair(pair, tmp_path)
    lp = light_path(p)
    g = onnx.load(str(lp))
    for prop in g.metadata_props:  # what another export's light graph of the same model carries: another id
        if prop.key == "ditdeploy.export_id":
            prop.value = "0" * 32
    onnx.save(g, str(lp))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load(p)
    # even with the manifest's hashes rewritten to match, the graphs' export ids differ
    mp = tmp_path / "tiny.onnx.json"
    m = json.loads(mp.read_text())
    m["files"]["tiny.light.onnx"]["sha256"] = sha256_file(lp)
    mp.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="another export") as e:
        load(p)
    assert "\n" not in str(e.value)
