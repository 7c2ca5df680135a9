"""Torch-free deploy: `ditdeploy sample` and ONNX Runtime / OpenVINO runtimes in a process where `import torch` fails.

Each test runs a fresh interpreter whose first statement is ``sys.modules['torch'] = None`` (so any
``import torch``, direct or inside a library, raises ImportError), then checks that no ``torch`` module got loaded.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import rt_artifacts

from ditdeploy.proof import distances
from ditdeploy.runtimes import load, load_decoder

BLOCK = "import sys\nsys.modules['torch'] = None\n"
TAIL = ("\nloaded = sorted(m for m, v in sys.modules.items() if m.split('.')[0] == 'torch' and v is not None)"
        "\nprint('TORCH_MODULES', loaded)\n")


def torchless(code: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-c", BLOCK + code + TAIL], cwd=cwd, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TORCH_MODULES []" in out.stdout, out.stdout
    return out


@pytest.fixture(scope="session")
def px(tmp_path_factory):
    return rt_artifacts.pixel_artifacts(tmp_path_factory.getbasetemp() / "rt")


@pytest.fixture(scope="session")
def lt(tmp_path_factory):
    return rt_artifacts.latent_artifacts(tmp_path_factory.getbasetemp() / "rt")


def test_block_really_blocks_torch(tmp_path):
    out = subprocess.run([sys.executable, "-c", BLOCK + "import torch"], capture_output=True, text=True)
    assert out.returncode != 0 and "import of torch halted" in out.stderr


def test_no_argument_sample_runs_without_torch(tmp_path):
    assert rt_artifacts.shipped() is not None, "the shipped default model ditdeploy/assets/digits.onnx is missing"
    t0 = time.perf_counter()
    out = torchless("from ditdeploy.cli import main\nmain(['sample', '--no-progress'])", cwd=tmp_path)
    wall = time.perf_counter() - t0
    png = tmp_path / "samples.png"
    assert png.exists() and png.stat().st_size > 1000
    assert "timing:" in out.stderr and "onnxruntime:CPUExecutionProvider:fp32" in out.stderr
    print(f"\nno-arg `ditdeploy sample` in a fresh torch-less process: {wall:.1f} s wall")


def test_runtimes_load_and_run_without_torch(px, lt, tmp_path):
    res = tmp_path / "out.npz"
    code = f"""
import numpy as np
from ditdeploy.runtimes import load, load_decoder
rng = np.random.default_rng(0)
outs = {{}}
for key, path, backend in [("px_ort", {str(px['onnx'])!r}, None), ("px_ov", {str(px['xml'])!r}, None),
                           ("lt_ov_onnx", {str(lt['onnx'])!r}, "openvino")]:
    den = load(path, backend=backend)
    c = den.config
    x = np.random.default_rng(1).standard_normal((3, c.in_channels, c.input_size, c.input_size), dtype=np.float32)
    outs[key] = den(x, np.array([0, 500, 999]), np.array([0, 1, c.num_classes]))
z = np.random.default_rng(2).standard_normal((2, 4, 4, 4), dtype=np.float32)
outs["vae_ort"] = load_decoder({str(lt['vae_onnx'])!r})(z)
outs["vae_ov"] = load_decoder({str(lt['vae_onnx'])!r}, backend="openvino")(z)
np.savez({str(res)!r}, **outs)
"""
    torchless(code, cwd=tmp_path)
    got = np.load(res)
    for key, ckpt in (("px_ort", px["ckpt"]), ("px_ov", px["ckpt"]), ("lt_ov_onnx", lt["ckpt"])):
        ref = load(ckpt)  # torch reference, in this (torch-enabled) process
        c = ref.config
        x = np.random.default_rng(1).standard_normal((3, c.in_channels, c.input_size, c.input_size), dtype=np.float32)
        want = ref(x, np.array([0, 500, 999]), np.array([0, 1, c.num_classes]))
        assert distances.rel_l2(got[key], want) < 1e-5, key
    z = np.random.default_rng(2).standard_normal((2, 4, 4, 4), dtype=np.float32)
    want = load_decoder(lt["vae_dir"])(z)
    for key in ("vae_ort", "vae_ov"):
        assert distances.rel_l2(got[key], want) < 1e-5, key


def test_latent_sample_with_openvino_without_torch(lt, tmp_path):
    code = (f"from ditdeploy.cli import main\nmain(['sample', '--engine', {str(lt['xml'])!r}, '--steps', '4', "
            f"'--no-progress', '--npz', 'l.npz', '--out', 'l.png'])")
    out = torchless(code, cwd=tmp_path)
    assert "openvino:CPU:fp32" in out.stderr
    with np.load(tmp_path / "l.npz") as z:
        assert z["arr_0"].shape == (30, 32, 32, 3)


def test_torch_backend_without_torch_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-c", BLOCK + "from ditdeploy.cli import main\n"
                          "main(['sample', '--backend', 'torch', '--no-progress'])"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    err = out.stderr.strip()
    assert out.returncode == 2 and "\n" not in err
    assert err.startswith("error: the torch reference backend needs PyTorch")
    assert not (tmp_path / "samples.png").exists()
