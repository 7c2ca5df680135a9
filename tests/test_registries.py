"""The three registries (samplers, backends, export formats): a sampler, backend or format registered in one place
appears in the CLI's choices and --help and works end to end; every list derives from them."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main

from ditdeploy.diffusion import SAMPLERS, SamplerSpec, register_sampler, sample, samplers, space_timesteps
from ditdeploy.diffusion.spacing import even_rule
from ditdeploy.errors import DitDeployError

ROOT = Path(__file__).resolve().parent.parent
DIGITS_ONNX = ROOT / "ditdeploy" / "assets" / "digits.onnx"
FAST = ["--steps", "3", "--num-per-label", "1", "--no-out", "--no-progress"]


def _help(monkeypatch, command: str) -> str:
    """``ditdeploy COMMAND --help`` at 250 columns (so a choice list is not wrapped)."""
    monkeypatch.setenv("COLUMNS", "250")
    code, out, err = run_main([command, "--help"])
    assert code == 0, err
    return out


@contextlib.contextmanager
def registered(table: dict, name: str):
    """Remove ``table[name]`` afterwards (the registries are process-wide)."""
    try:
        yield
    finally:
        table.pop(name, None)


# ----------------------------------------------------------------------------------------------------- samplers
def _ddim_even(model, x, base, ts, *, eta, noise, **common):
    """A toy sampler: DDIM on the evenly rounded spacing rule (DDPM's) instead of DDIM's fixed stride."""
    return samplers.ddim(model, x, base.respace(ts), eta=float(eta), noise=noise, **common)


@pytest.fixture
def toy_sampler():
    with registered(SAMPLERS, "ddim-even"):
        yield register_sampler(SamplerSpec("ddim-even", _ddim_even, even_rule, options=("eta",)))


def test_registered_sampler_runs_on_its_own_timesteps(toy_sampler):
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 4), dtype=np.float32)
    seen = []
    out = sample(lambda x, t, y: 0.1 * x, x, np.zeros(2, np.int64), method="ddim-even", steps=10,
                 callback=lambda k, t, x: seen.append(t))
    # the even rule on 1000 steps: 0, 111, ..., 999 (official space_timesteps "10"), visited from high noise down
    assert seen == sorted(space_timesteps(1000, "10"), reverse=True)
    assert seen[0] == 999 and seen != [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    ddim = sample(lambda x, t, y: 0.1 * x, x, np.zeros(2, np.int64), method="ddim", steps=10)
    assert np.isfinite(out).all() and not np.allclose(out, ddim)  # a different trajectory, not an alias
    with pytest.raises(DitDeployError, match="unknown sampler 'nope': choose one of ddim, ddpm, dpm-solver\\+\\+, ddim-even"):
        sample(lambda x, t, y: x, x, np.zeros(2, np.int64), method="nope")


def test_registered_sampler_in_cli_choices_help_and_runs(toy_sampler, tmp_path, monkeypatch):
    assert "<ddim|ddpm|dpm-solver++|ddim-even>" in _help(monkeypatch, "sample")
    npz = tmp_path / "s.npz"
    code, _, err = run_main(["sample", "--sampler", "ddim-even", "--npz", npz, *FAST])
    assert code == 0, err
    code, _, err = run_main(["sample", "--sampler", "ddim", "--npz", tmp_path / "d.npz", *FAST])
    assert code == 0, err
    a, b = np.load(npz)["arr_0"], np.load(tmp_path / "d.npz")["arr_0"]
    assert a.shape == b.shape == (10, 8, 8, 1) and not np.array_equal(a, b)


def test_eta_only_for_samplers_that_declare_it():
    from ditdeploy.diffusion import check_settings

    check_settings("ddim", 10, 1.0, 0.5)
    with pytest.raises(DitDeployError, match="--eta is only used by --sampler ddim, not 'ddpm'"):
        check_settings("ddpm", 10, 1.0, 0.5, flags=True)


# ----------------------------------------------------------------------------------------------------- backends
def load_denoiser(path, *, threads: int | None = None, verify: bool = True):
    """The toy backend's entry point: ONNX Runtime under another name (its keyword parameters are its options)."""
    from ditdeploy.runtimes.onnxruntime import load_denoiser as ort

    den = ort(path, threads=threads, verify=verify)
    den.name = "toyrt:" + den.name
    return den


@pytest.fixture
def toy_backend():
    from ditdeploy.runtimes import registry

    spec = registry.BackendSpec("toyrt", reads=(".onnx",), aliases=("toy",), distributions=("numpy",),
                                imports="numpy")
    with registered(registry._REGISTRY, "toyrt"):
        yield registry.register_backend(spec, sys.modules[__name__])


def test_registered_backend_in_cli_info_and_runs(toy_backend, tmp_path, monkeypatch):
    from ditdeploy.runtimes import load, options_for, resolve_backend

    assert resolve_backend(DIGITS_ONNX) == "onnxruntime"  # it claims no suffix: never chosen by default
    assert resolve_backend(DIGITS_ONNX, "TOY") == "toyrt"
    assert options_for("toyrt") == ("threads", "verify")
    with pytest.raises(DitDeployError, match="did you mean 'threads'"):
        load(DIGITS_ONNX, backend="toyrt", thread=1)
    assert "<aoti|onnxruntime|openvino|tensorrt|torch|toyrt>" in _help(monkeypatch, "sample")
    code, out, err = run_main(["info"])
    assert code == 0 and any(ln.split() == ["toyrt", "available"] for ln in out.splitlines()), out
    runs = {}
    for b in ("toyrt", "onnxruntime"):
        js = tmp_path / f"{b}.json"
        code, _, err = run_main(["sample", "--backend", b, "--npz", tmp_path / f"{b}.npz", "--json", js, *FAST])
        assert code == 0, err
        runs[b] = np.load(tmp_path / f"{b}.npz")["arr_0"]
        assert json.loads(js.read_text())["backend"].startswith(f"{b}:" if b == "toyrt" else "onnxruntime:")
    np.testing.assert_array_equal(runs["toyrt"], runs["onnxruntime"])  # same graph, same runtime underneath


def test_backend_lists_derive_from_the_registry():
    from ditdeploy.bench.harness import default_backends
    from ditdeploy.runtimes.registry import backends, suffix_backends, tool_versions

    assert set(backends()) == {"aoti", "onnxruntime", "openvino", "tensorrt", "torch"}
    claimed = suffix_backends()
    assert claimed[".onnx"] == "onnxruntime" and claimed[".pt2"] == "aoti" and claimed[".engine"] == "tensorrt"
    assert default_backends(Path("m.plan")) == ["tensorrt"] and default_backends(Path("m.pt2")) == ["aoti"]
    assert default_backends(Path("m.onnx"))[:2] == ["onnxruntime", "openvino"]  # OpenVINO is installed here
    assert {"python", "numpy", "onnxruntime", "openvino"} <= set(tool_versions())


# ------------------------------------------------------------------------------------------------------ formats
def _build_safetensors(job):
    """A toy format: the torch weights as .safetensors plus a manifest (what the torch backend reads)."""
    from ditdeploy.artifact.files import atomic_dir, manifest_path, write_json_atomic
    from ditdeploy.artifact.manifest import Manifest
    from ditdeploy.sources.checkpoints import save_safetensors

    with atomic_dir([job.out, manifest_path(job.out)]) as tmp:
        save_safetensors(job.net, tmp / job.out.name, job.net.config)
        m = Manifest.build(job.out, [tmp / job.out.name], kind="denoiser", format="safetensors",
                           precision=job.precision, config=json.loads(job.net.config.to_json()), **job.extra())
        write_json_atomic(tmp / manifest_path(job.out).name, m)
    return m


@pytest.fixture
def toy_format():
    from ditdeploy.artifact.formats import FORMATS, FormatSpec, register_format

    with registered(FORMATS, "safetensors"):
        yield register_format(FormatSpec("safetensors", ".safetensors", _build_safetensors, precisions=("fp32",)))


def test_registered_format_in_cli_and_exports(toy_format, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    assert "<onnx|openvino|trt|tensorrt|aoti|diffusers|triton|safetensors>" in _help(monkeypatch, "export")
    code, _, err = run_main(["export", "--model", "digits", "--fmt", "safetensors", "--precision", "fp16"])
    assert code == 2 and "--fmt safetensors builds fp32" in err
    art = tmp_path / "d.safetensors"
    code, out, err = run_main(["export", "--model", "digits", "--fmt", "safetensors", "--out", art])
    assert code == 0, err
    assert json.loads((tmp_path / "d.safetensors.json").read_text())["format"] == "safetensors"
    ref = ROOT / "ditdeploy" / "assets" / "digits.safetensors"
    npz = {}
    for name, engine in (("export", art), ("shipped", ref)):
        code, _, err = run_main(["sample", "--engine", engine, "--npz", tmp_path / f"{name}.npz", *FAST])
        assert code == 0, err
        npz[name] = np.load(tmp_path / f"{name}.npz")["arr_0"]
    np.testing.assert_array_equal(npz["export"], npz["shipped"])  # the same weights, bit for bit


def test_format_lists_derive_from_the_registry(tmp_path):
    from ditdeploy.artifact.formats import canonical_format, format_names, get_format
    from ditdeploy.artifact.output_policy import artifact_files

    assert format_names() == ("onnx", "openvino", "trt", "tensorrt", "aoti", "diffusers", "triton")
    assert canonical_format("tensorrt") == "trt" and get_format("tensorrt").suffix == ".plan"
    assert artifact_files(tmp_path / "m.onnx")[2:] == [tmp_path / "m.onnx.data"]
    assert artifact_files(tmp_path / "m.xml")[2:] == [tmp_path / "m.bin"]
    with pytest.raises(DitDeployError, match="unknown format 'tflite'"):
        canonical_format("tflite")
