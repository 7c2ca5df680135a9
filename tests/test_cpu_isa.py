"""The CPU-ISA module and the INT8 form chosen by target (issue 20, issue 24 item 1).

- ``detect()`` against an independent read of /proc/cpuinfo; the ``DITDEPLOY_CPU_ISA`` override and its errors;
- the target each CPU family gets (x86 without VNNI -> 7-bit weights; VNNI/AMX, non-x86 -> full range);
- the form in the artifact itself: the int8 weight initializers of the shipped digits model quantized for each target
  lie in [-64, 64] for cpu-avx2 and use the full range otherwise; the manifest records target, form and ``cpu_isa``;
- the loaders: an artifact whose full-range weights this CPU would saturate on is said in one line and ONNX Runtime
  runs it on its u8u8 kernels (session option), and the CLI refuses target/format mismatches in one line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_main, shipped_digits_copy

from ditdeploy.errors import DitDeployError
from ditdeploy.system import cpu_isa

onnx = pytest.importorskip("onnx")


def _proc_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_detect_reads_this_cpu(monkeypatch):
    monkeypatch.delenv(cpu_isa.ENV, raising=False)
    isa = cpu_isa.detect()
    assert set(isa.flags) == _proc_flags() & set(cpu_isa.ISA_FLAGS)
    assert isa.vnni == bool(_proc_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
    rec = isa.record()
    assert rec["flags"] == [f for f in cpu_isa.ISA_FLAGS if f in isa.flags] and rec["int8_target"] == isa.int8_target
    assert cpu_isa.detect() is isa  # read once


@pytest.mark.parametrize("flags, target", [
    ("avx2,fma", "cpu-avx2"),  # AMD Zen2/Zen3, Intel Haswell..Coffee Lake
    ("avx2 fma avx512f avx512bw", "cpu-avx2"),  # Skylake-SP: AVX-512 but vpmaddubsw, no VNNI
    ("avx2,avx512f,avx512_vnni", "cpu-vnni"),  # Cascade Lake, Zen4
    ("avx2,avx_vnni", "cpu-vnni"),  # Alder Lake
    ("avx2,amx_tile,amx_int8", "cpu-vnni"),
    ("none", "cpu-avx2"),
])
def test_override_picks_the_int8_target(monkeypatch, flags, target):
    monkeypatch.setenv(cpu_isa.ENV, flags)
    isa = cpu_isa.detect()
    assert isa.source == cpu_isa.ENV and cpu_isa.resolve_int8_target("auto") == target
    assert isa.int8_saturates == (target == "cpu-avx2") == ("no VNNI" in isa.label())


def test_non_x86_and_bad_names():
    arm = cpu_isa.CpuIsa("aarch64", frozenset({"asimd", "asimddp"}), "cpuinfo")
    assert not arm.int8_saturates and arm.int8_target == "cpu-vnni"  # no x86 u8s8 pair-add into int16
    with pytest.raises(DitDeployError, match="unknown INT8 target"):
        cpu_isa.resolve_int8_target("avx2")
    assert cpu_isa.resolve_int8_target("TRT") == "trt"


def test_bad_override_is_one_line_error(monkeypatch):
    monkeypatch.setenv(cpu_isa.ENV, "avx2,avx513")
    with pytest.raises(DitDeployError, match="avx513"):
        cpu_isa.detect()


def _int8_weights(path: Path) -> list[np.ndarray]:
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return [numpy_helper.to_array(i) for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8
            and len(i.dims) == 2]


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """The shipped digits model quantized (dynamic) with ``auto`` on a simulated AVX2 CPU and on a simulated VNNI
    CPU, plus the explicit cpu-avx2 target on this CPU."""
    from ditdeploy.calibration.quantize import quantize_int8

    d = tmp_path_factory.mktemp("forms")
    src = shipped_digits_copy(d)
    mp = pytest.MonkeyPatch()
    out = {}
    try:
        for name, flags in (("avx2", "avx2,fma"), ("vnni", "avx2,fma,avx512f,avx512_vnni")):
            mp.setenv(cpu_isa.ENV, flags)
            out[name] = d / f"digits-int8-{name}.onnx"
            quantize_int8(src, out[name], None, mode="dynamic", progress=False)
    finally:
        mp.undo()
    return out


def test_form_follows_the_cpu(forms):
    avx2 = json.loads(forms["avx2"].with_name(forms["avx2"].name + ".json").read_text())
    vnni = json.loads(forms["vnni"].with_name(forms["vnni"].name + ".json").read_text())
    assert avx2["cpu_isa"]["flags"] == ["avx2", "fma"] and avx2["cpu_isa"]["source"] == cpu_isa.ENV
    assert avx2["int8"]["target"] == "cpu-avx2" and avx2["int8"]["weight_bits"] == 7
    assert avx2["int8"]["saturates_without_vnni"] is False
    assert vnni["int8"]["target"] == "cpu-vnni" and vnni["int8"]["saturates_without_vnni"] is True
    w7, w8 = _int8_weights(forms["avx2"]), _int8_weights(forms["vnni"])
    assert len(w7) == len(w8) == 16  # the token GEMMs of 4 blocks (qkv, proj, fc1, fc2)
    # the property that rules out int16 saturation: |w| <= 64, so |a*w + a'*w'| <= 2*255*64 = 32640 <= 32767
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in w7) == 64
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in w8) == 127
    # both forms pass the int8 gate on the trained model (parity vs fp32 recorded at quantization)
    for m in (avx2, vnni):
        assert m["parity"]["per_call_cosine_min"] > 0.999


def test_loader_says_so_and_picks_ort_u8u8_kernels(forms, monkeypatch, caplog):
    from ditdeploy.runtimes import load
    from ditdeploy.runtimes.base import _SAID
    from ditdeploy.runtimes.onnxruntime import X64_QUANT_PRECISION

    _SAID.clear()
    monkeypatch.setenv(cpu_isa.ENV, "avx2,fma")
    rng = np.random.default_rng(0)
    x, t, y = rng.standard_normal((2, 1, 8, 8)).astype(np.float32), np.array([10, 900]), np.array([3, 7])
    with caplog.at_level(logging.WARNING, logger="ditdeploy.runtimes"):
        full = load(forms["vnni"], threads=1)
        safe = load(forms["avx2"], threads=1)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "\n" not in said[0], said  # one line, for the full-range artifact only
    assert forms["vnni"].name in said[0] and "no VNNI" in said[0] and "--int8-target cpu-avx2" in said[0]
    def option(den) -> str | None:
        try:
            return den.session.get_session_options().get_session_config_entry(X64_QUANT_PRECISION)
        except RuntimeError:  # ORT: "does not have configuration with key"
            return None

    assert option(full) == "1" and option(safe) is None
    pytest.importorskip("openvino")  # OpenVINO has no such switch: it says so and runs the artifact as it is
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ditdeploy.runtimes"):
        ov = load(forms["vnni"], backend="openvino", threads=1)
        load(forms["avx2"], backend="openvino", threads=1)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "OpenVINO" in said[0] and forms["vnni"].name in said[0], said
    assert np.isfinite(ov(x, t, y)).all()
    monkeypatch.setenv(cpu_isa.ENV, "avx2,fma,avx512_vnni")
    plain = load(forms["vnni"], threads=1)
    assert option(plain) is None
    # u8u8 gives the exact integer result: on this machine the same output as the default kernels where they do
    # not saturate (VNNI); on an AVX2 CPU it is what keeps the int8 cosine at its VNNI value
    # (/proc/cpuinfo names the real CPU; under experiments/cpu_mask.py the kernels are AVX2 ones whatever it says)
    if not cpu_isa.CpuIsa("x86_64", frozenset(_proc_flags()), "cpuinfo").int8_saturates and \
            not os.environ.get("DITDEPLOY_CPUID_MASK"):
        np.testing.assert_allclose(full(x, t, y), plain(x, t, y), rtol=0, atol=1e-5)


def test_cli_refuses_target_mismatches(tmp_path):
    code, _, err = run_main(["export", "--model", "digits", "--precision", "int8", "--int8-mode", "dynamic",
                             "--int8-target", "trt", "--out", tmp_path / "x.onnx"])
    assert_one_line_error(code, err, ["--int8-target trt", "static"])
    code, _, err = run_main(["export", "--model", "digits", "--int8-target", "cpu-avx2", "--out", tmp_path / "y.onnx"])
    assert_one_line_error(code, err, ["--int8-target", "--precision int8"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("simulated", [None, "avx2,fma"], ids=["this-cpu", "simulated-avx2"])
def test_int8_checks_name_the_cpu(tmp_path, monkeypatch, simulated):
    """`check`'s INT8 gates on the shipped (trained) digits model quantized for this CPU (``auto``) and for a
    simulated AVX2-only CPU: the report records the ISA, every assertion and the one-line failure name it, so a red
    run on another machine says which CPU (and INT8 form) it was."""
    pytest.importorskip("torch")
    from ditdeploy.calibration.quantize import quantize_int8
    from ditdeploy.proof.parity import THRESHOLDS

    if simulated:
        monkeypatch.setenv(cpu_isa.ENV, simulated)
    isa = cpu_isa.detect()
    q = tmp_path / "digits-int8.onnx"
    m = quantize_int8(shipped_digits_copy(tmp_path), q, None, mode="dynamic", progress=False)
    where = f"INT8 form {m['int8']['target']} on CPU {isa.label()}"
    assert m["int8"]["target"] == isa.int8_target, where
    js = tmp_path / "c.json"
    fast = ["check", "--engine", q, "--steps", "5", "--batch-size", "2", "--timesteps", "4"]
    code, out, err = run_main([*fast, "--json", js])
    rep = json.loads(js.read_text())
    assert rep["cpu_isa"] == isa.record() and f"cpu: {isa.label()}" in out, where
    assert code == 0 and rep["passed"], f"{where}: {rep['failures']}"
    th = THRESHOLDS["int8"]
    assert rep["precision"] == "int8" and rep["calls_worst"]["cosine"] >= th.call_cosine, where
    assert rep["end_to_end"]["psnr"] >= th.psnr, where
    code, _, err = run_main([*fast, "--per-call-only", "--threshold-call-cosine", "0.99999999"])
    assert_one_line_error(code, err, ["cosine", isa.label()], strict=False)
