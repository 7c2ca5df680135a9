"""Runs tests/training_loop_cases.py (SIGKILL + resume, disk-full, checkpoint contents, precision options, CLI
errors) in a fresh pytest process.

Isolation, not skipping: every case and assertion lives in training_loop_cases.py. In a single long pytest session
on the 2-core CI box, the interpreter died with SIGSEGV at the first kill/resume case after ~430 earlier tests
(ONNX Runtime, OpenVINO, forkserver, torch in one process); the same cases pass alone and beside each suspected
module. Running them in their own process keeps the default suite's exit status meaningful.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("training_loop_cases.py")


def _run(marker: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, str(CASES)],
        capture_output=True, text=True, cwd=CASES.parent.parent,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def test_training_loop_cases() -> None:
    _run("not slow")


@pytest.mark.slow
def test_training_loop_slow_cases() -> None:
    _run("slow")
