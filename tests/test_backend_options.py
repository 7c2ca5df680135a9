"""Backend options are a typed, validated set per backend (ditdeploy/runtimes/options.py): a misspelt option is a
one-line error naming the valid ones, from the library and from the CLI, before anything loads."""

from __future__ import annotations

import pytest
from conftest import run_main

from ditdeploy.errors import DitDeployError
from ditdeploy.runtimes import backend_names, load, load_decoder, options_for
from ditdeploy.sources.shipped import DIGITS_ONNX


def test_every_backend_declares_its_options_without_kwargs():
    for b in backend_names():  # raises TypeError if an entry point still ends in **kwargs
        assert "threads" in options_for(b) or b == "tensorrt", b
    assert {"providers", "threads", "spinning", "verify"} <= set(options_for("onnxruntime"))
    assert {"precision_hint", "performance_hint"} <= set(options_for("openvino"))
    assert "providers" in options_for("onnxruntime", "decoder") and "device" in options_for("torch", "decoder")
    assert options_for("tensorrt", "decoder") == ()


def test_misspelt_option_is_one_line_naming_the_valid_ones():
    with pytest.raises(DitDeployError) as e:
        load(DIGITS_ONNX, thread=1)
    msg = str(e.value)
    assert "\n" not in msg and "'thread'" in msg and "did you mean 'threads'" in msg
    assert "valid options: " in msg and all(o in msg for o in options_for("onnxruntime"))
    with pytest.raises(DitDeployError, match="unknown option 'precision_hint' for the onnxruntime decoder"):
        load_decoder(DIGITS_ONNX, precision_hint="bf16")  # refused before the file is even opened as a decoder
    assert load(DIGITS_ONNX, threads=1).name.startswith("onnxruntime:")  # a valid option still loads


def test_misspelt_option_via_the_cli(capsys):
    code, out, err = run_main(["bench", "--backends", "onnxruntime:thread=1", "--steps", "1", "--repeats", "1",
                               "--no-probe", "--in-process"])
    assert code == 2, (out, err)
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err
    assert "unknown option 'thread' for the onnxruntime denoiser (did you mean 'threads'?)" in line
    assert "valid options:" in line


def test_cli_backend_options_are_typed_values():
    from ditdeploy.bench.harness import parse_backend_spec

    assert parse_backend_spec("ort:threads=2,spinning=true") == ("onnxruntime", {"threads": 2, "spinning": True},
                                                                 "onnxruntime:threads=2,spinning=true")
    assert parse_backend_spec("openvino:bf16")[1] == {"precision_hint": "bf16"}
    with pytest.raises(DitDeployError, match="KEY=VALUE"):
        parse_backend_spec("onnxruntime:threads=1,=3")


def test_option_values_are_type_checked():
    with pytest.raises(DitDeployError, match="option 'threads' takes int or None, got 'two'"):
        load(DIGITS_ONNX, threads="two")
    with pytest.raises(DitDeployError, match="option 'spinning' takes bool, got 1"):
        load(DIGITS_ONNX, spinning=1)
