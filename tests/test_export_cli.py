"""`ditdeploy export` end to end through the real CLI entry point: weights resolution (incl. the official name via a
loopback download), VAE + denoiser, OpenVINO / TensorRT / INT8 dispatch, interrupts."""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_export import independent_parity, tiny_model
from test_export_vae import make_tiny_vae

from ditdeploy.artifact.files import sha256_file
from ditdeploy.artifact.manifest import load_manifest
from ditdeploy.cli import main
from ditdeploy.config.variants import DIGITS, variant_config
from ditdeploy.export.pipeline import default_out
from ditdeploy.sources.checkpoints import save_safetensors


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = tiny_model()
    path = d / "tiny.safetensors"
    save_safetensors(model, path, model.config)
    return path, model


def test_default_out_names():
    assert default_out(variant_config("XL/2", 512), "fp16", "onnx") == Path("dit-xl-2-512-fp16.onnx")
    assert default_out(DIGITS, "fp32", "onnx") == Path("digits-fp32.onnx")
    assert default_out(variant_config("S/2", conditioning="in-context"), "fp32", "openvino") == Path(
        "dit-s-2-256-in-context-fp32.xml")
    assert default_out(variant_config("B/4"), "int8", "trt") == Path("dit-b-4-256-int8.plan")


def test_weights_are_required(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DITDEPLOY_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(["export", "--model", "XL/2"], capsys)
    assert code == 2 and "--random-weights" in err and "DiT-XL-2-256x256.pt" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["export", "--model", "XL/2", "--checkpoint", "DiT-XL-2-256x256.pt"], capsys)
    assert code == 2
    assert str(tmp_path / "cache" / "DiT-XL-2-256x256.pt") in err and "--download" in err
    code, _, err = run_cli(["export", "--model", "XL/2", "--checkpoint", str(tmp_path / "nope.pt")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(["export", "--model", "S/2", "--random-weights", "--precision", "int8"], capsys)
    assert code == 2 and "--calibration" in err
    code, _, err = run_cli(["export", "--model", "S/2", "--random-weights", "--fmt", "tflite"], capsys)
    assert code == 2 and "--fmt" in err
    code, _, err = run_cli(["export", "--model", "Q/3", "--random-weights"], capsys)
    assert code == 2 and "unknown variant" in err
    assert not any(tmp_path.glob("*.onnx"))


def test_official_name_downloaded_from_loopback(tmp_path, tiny_ckpt, capsys, monkeypatch):
    """--checkpoint <official name> --download: fetched through ditdeploy.sources.official_weights (here from a loopback server
    standing in for the official host; the bytes are a tiny model's), then exported with its sha256 recorded."""
    src, model = tiny_ckpt
    served = tmp_path / "srv"
    served.mkdir()
    (served / "DiT-XL-2-256x256.pt").write_bytes(src.read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        cache = tmp_path / "cache"
        monkeypatch.setenv("DITDEPLOY_CACHE", str(cache))
        monkeypatch.setenv("DITDEPLOY_WEIGHTS_URL", f"http://127.0.0.1:{httpd.server_address[1]}")
        out = tmp_path / "o" / "m.onnx"
        code, stdout, err = run_cli(["export", "--checkpoint", "DiT-XL-2-256x256.pt", "--download", "--out",
                                     str(out)], capsys)
    finally:
        httpd.shutdown()
    assert code == 0, err
    assert (cache / "DiT-XL-2-256x256.pt").exists() and "wrote" in stdout
    m = load_manifest(out)
    assert m["source"]["kind"] == "checkpoint" and m["source"]["sha256"] == sha256_file(src)
    assert m["source_checkpoint"]["sha256"] == sha256_file(src)
    assert m["random_weights"] is False
    for r in independent_parity(out, model):
        assert r["rel_l2"] <= 1e-4


def test_checkpoint_with_vae(tmp_path, tiny_ckpt, capsys):
    src, model = tiny_ckpt
    vae_dir = tmp_path / "vae"
    make_tiny_vae(vae_dir)
    out = tmp_path / "art" / "tiny.onnx"
    code, stdout, err = run_cli(["export", "--checkpoint", str(src), "--vae", str(vae_dir), "--out", str(out)],
                                capsys)
    assert code == 0, err
    dm = load_manifest(out.with_name("vae_decoder.onnx"))
    m = load_manifest(out)
    assert m["decoder"] == "vae_decoder.onnx" and dm["kind"] == "decoder"
    assert dm["parity"]["batches"][0]["latent_shape"][2:] == [model.config.input_size] * 2
    assert m["parity"]["worst"]["rel_l2"] <= 1e-4 and m["source"]["name"] == "tiny.safetensors"
    assert stdout.count("wrote") == 2


def test_openvino_dispatch(tmp_path, tiny_ckpt, capsys):
    src, _ = tiny_ckpt
    out = tmp_path / "tiny.xml"
    code, _, err = run_cli(["export", "--checkpoint", str(src), "--fmt", "openvino", "--out", str(out)], capsys)
    assert code == 0, err
    m = load_manifest(out)
    assert m["format"] == "openvino" and m["kind"] == "denoiser"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.bin", "tiny.xml", "tiny.xml.json"]  # no ONNX left


def test_trt_without_tensorrt_fails_cleanly(tmp_path, tiny_ckpt, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: this test covers machines without it")
    except ImportError:
        pass
    src, _ = tiny_ckpt
    out = tmp_path / "tiny.plan"
    code, _, err = run_cli(["export", "--checkpoint", str(src), "--fmt", "trt", "--no-verify", "--out", str(out)],
                           capsys)
    assert "--no-verify" in err and "NOT checked" in err  # loud
    assert code == 2 and "tensorrt" in err.lower()
    assert list(tmp_path.iterdir()) == []  # neither the engine nor the intermediate ONNX


def test_int8_dynamic_dispatch(tmp_path, tiny_ckpt, capsys):
    src, _ = tiny_ckpt
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(["export", "--checkpoint", str(src), "--precision", "int8", "--int8-mode", "dynamic",
                            "--out", str(out)], capsys)
    assert code == 0, err
    m = load_manifest(out)
    assert m["precision"] == "int8" and m["kind"] == "denoiser"
    # the fp32 intermediate is not kept, but the checkpoint the model came from stays traceable (for `check`)
    assert m["source"]["artifact"] == "q-fp32.onnx" and m["source"]["precision"] == "fp32"
    assert m["source_checkpoint"]["sha256"] == sha256_file(src)
    assert m.reference_checkpoint() == src
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the fp32 intermediate is gone


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_leaves_nothing(tmp_path, tiny_ckpt, sig):
    src, _ = tiny_ckpt
    d = tmp_path / "o"
    d.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # a background shell starts children with SIGINT ignored; restore the default so Python installs its handler
    proc = subprocess.Popen([sys.executable, "-m", "ditdeploy", "export", "--checkpoint", str(src), "--out",
                             str(d / "m.onnx")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".ditdeploy-") for p in d.iterdir()):
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "export finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143)
    assert (b"interrupted" if sig == signal.SIGINT else b"terminated") in err
    assert len(err.decode().strip().splitlines()) <= 2  # the one-line error (after at most one note), no traceback
    assert list(d.iterdir()) == []


@pytest.mark.slow
def test_random_weights_recorded(tmp_path, capsys, monkeypatch):
    """--random-weights on a named variant (S/8 at 256: the fastest official one to export)."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["export", "--model", "S/8", "--random-weights", "--seed", "3"], capsys)
    assert code == 0, err
    assert "RANDOM" in err
    m = load_manifest(tmp_path / "dit-s-8-256-fp32.onnx")
    assert m["random_weights"] is True and m["source"] == {"kind": "random", "seed": 3,
                                                            "note": "random weights (benchmarking only)"}
    assert m["config"]["variant"] == "S/8" and m["source_checkpoint"] is None
    assert json.loads((tmp_path / "dit-s-8-256-fp32.onnx.json").read_text())["parity"]["passed"] is True


def test_shipped_digits_by_name(tmp_path, capsys):
    from ditdeploy.sources.checkpoints import load_model
    from ditdeploy.sources.shipped import DIGITS_CHECKPOINT

    if not DIGITS_CHECKPOINT.exists():
        pytest.skip("the shipped digits model has not been trained into ditdeploy/assets yet")
    out = tmp_path / "digits.onnx"
    code, _, err = run_cli(["export", "--model", "digits", "--out", str(out)], capsys)
    assert code == 0, err
    m = load_manifest(out)
    assert m["source"]["kind"] == "shipped" and m["source"]["sha256"] == sha256_file(DIGITS_CHECKPOINT)
    assert m["config"]["variant"] == "digits" and m["random_weights"] is False
    for r in independent_parity(out, load_model(DIGITS_CHECKPOINT, "digits")):
        assert r["rel_l2"] <= 1e-4
    code, _, err = run_cli(["export", "--model", "digits", "--image-size", "256"], capsys)
    assert code == 2 and "--image-size" in err
