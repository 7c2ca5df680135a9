"""runtimes.torch_env: the torch APIs of the .pt2 / CUDA-graph / FP8 code against the running torch (minimum 2.11,
the GPU machine's release) and the CUDA toolkit that AOTInductor's CUDA build needs."""

from __future__ import annotations

import os
import stat

import pytest

from ditdeploy.runtimes.torch_env import APIS, MIN_TORCH, Api, api_problems, find_cuda_toolkit, release

torch = pytest.importorskip("torch")


def test_every_api_present_in_this_torch():
    assert release(torch.__version__) >= release(MIN_TORCH)
    assert api_problems(torch) == []
    features = {a.feature for a in APIS}
    assert {".pt2 export", ".pt2 load", "CUDA graphs", "FP8"} <= features
    # the loader call of runtimes/aoti.py: 5 positional arguments incl. run_single_threaded
    assert next(a for a in APIS if a.path == "_C._aoti.AOTIModelPackageLoader").arity == 5


def test_older_torch_and_missing_parameters_are_named():
    old = api_problems(torch, version="2.10.0")
    assert len(old) == len(APIS) and all(f"needs torch >= {MIN_TORCH}" in p and "2.10.0" in p for p in old)
    bad = (Api("x", "_inductor.aoti_load_package", ("run_single_threaded", "no_such_flag")),
           Api("y", "no_such_module.fn"), Api("z", "_C._aoti.AOTIModelPackageLoader", arity=3),
           Api("w", "ops.aten._scaled_mm.default", ("scale_a", "scale_c")))
    p = api_problems(torch, bad)
    assert len(p) == 4
    assert "no parameter no_such_flag" in p[0] and "missing" in p[1] and "takes 5 arguments" in p[2]
    assert "no parameter scale_c" in p[3]


def _exe(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_cuda_toolkit_detection(tmp_path):
    none, line = find_cuda_toolkit({"PATH": str(tmp_path / "empty")}, default_home=str(tmp_path / "cuda"))
    assert none is None and line.startswith("no CUDA toolkit") and "\n" not in line
    home = tmp_path / "tk"
    _exe(home / "bin" / "nvcc")  # found through PATH, as torch.utils.cpp_extension finds it
    got, line = find_cuda_toolkit({"PATH": str(home / "bin")}, default_home=str(tmp_path / "cuda"))
    assert got is None and "no include/cuda.h" in line and "nvcc on PATH" in line  # headers missing
    (home / "include").mkdir()
    (home / "include" / "cuda.h").write_text("")
    got, line = find_cuda_toolkit({"PATH": str(home / "bin")}, default_home=str(tmp_path / "cuda"))
    assert got == home.resolve() and "cuda.h found" in line
    got, _ = find_cuda_toolkit({"CUDA_HOME": str(home), "PATH": os.defpath}, default_home=str(tmp_path / "cuda"))
    assert got == home
    got, _ = find_cuda_toolkit({"PATH": ""}, default_home=str(home))  # /usr/local/cuda, the last guess
    assert got == home
