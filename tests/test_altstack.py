"""Regression test for the single-process-suite SIGSEGV (root cause in ditdeploy/system/altstack.py).

Each case runs in a fresh interpreter: two OpenVINO models compiled through different Cores, released out of
creation order, then subprocesses exit under a Python SIGCHLD handler (as torch's DataLoader installs one). The
interpreter's alternate signal stack must be the one it started with, and the process must survive.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("openvino")
if not sys.platform.startswith("linux"):
    pytest.skip("sigaltstack via libc: Linux only", allow_module_level=True)

SCRIPT = textwrap.dedent("""
    import faulthandler, gc, signal, subprocess, sys
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops
    from ditdeploy.system import altstack
    from ditdeploy.runtimes.openvino import compile_cpu

    def model():
        x = ops.parameter([1, 64], np.float32)
        return ov.Model([ops.matmul(x, ops.constant(np.ones((64, 64), np.float32)), False, False)], [x])

    faulthandler.enable()  # as pytest does: the interpreter owns an alternate signal stack
    start = altstack.current()
    guarded = sys.argv[1] == "guarded"
    if guarded:
        a = compile_cpu(model(), {})
        b = compile_cpu(model(), {})
    else:
        ca, cb = ov.Core(), ov.Core()
        a = ca.compile_model(model(), "CPU")
        b = cb.compile_model(model(), "CPU")
        del ca, cb
    del a; gc.collect()
    del b; gc.collect()
    print("restored", altstack.current() == start, flush=True)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    for _ in range(3):
        subprocess.run(["true"])
    print("survived", flush=True)
""")


def _run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)


def test_compile_cpu_keeps_the_signal_stack_and_the_process_survives():
    p = _run("guarded")
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr[-2000:])
    assert "restored True" in p.stdout and "survived" in p.stdout


def test_unguarded_openvino_reproduces_the_crash_or_is_fixed_upstream():
    """Documents the upstream behaviour the guard exists for: with plain ``compile_model`` the stack is not the
    interpreter's after out-of-order release and the process dies with SIGSEGV at the next handled signal. If a
    newer OpenVINO restores correctly, this says so (and the guard becomes a no-op)."""
    p = _run("plain")
    if "restored True" in p.stdout:
        assert p.returncode == 0 and "survived" in p.stdout
        pytest.skip("this OpenVINO restores the signal stack itself: the upstream bug is fixed")
    assert "restored False" in p.stdout
    assert p.returncode == -11, (p.returncode, p.stdout, p.stderr[-2000:])
