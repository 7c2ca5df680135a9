"""Serving pieces without a server: the wire format of a generate request and the step-level batcher (on the
shipped digits model in ONNX Runtime)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ditdeploy.run.generation import SampleRequest
from ditdeploy.serving.batcher import BatchedDenoiser, RowBatcher, Stopped
from ditdeploy.serving.protocol import GenerateRequest, WireError, decode_error


def test_generate_request_round_trips_through_kserve_parameters():
    s = SampleRequest(out=None, sampler="ddpm", steps=30, cfg_scale=2.5, seed=9, cfg_interval=[150, 750],
                      guide_all_channels=True)
    req = GenerateRequest(labels=[3, 7], first_index=12, timeout_s=5.0, sampling=s)
    back = GenerateRequest.from_wire(np.array([3, 7], np.int64), req.parameters(), max_images=8)
    assert back.labels == [3, 7] and back.first_index == 12 and back.timeout_s == 5.0
    for name in ("sampler", "steps", "cfg_scale", "seed", "cfg_interval", "guide_all_channels", "eta"):
        assert getattr(back.sampling, name) == getattr(s, name), name
    named = GenerateRequest(labels=["golden retriever", 4], sampling=SampleRequest(out=None))
    assert named.by_name() and named.parameters()["class_names"] == "golden retriever|4"
    assert GenerateRequest.from_wire(None, named.parameters(), 8).labels == ["golden retriever", 4]


@pytest.mark.parametrize("ids, params, says", [
    (np.array([1]), {"steps": True}, "steps must be an integer"),
    (np.array([1]), {"cfg_scale": float("inf")}, "cfg_scale must be a finite number"),
    (np.array([1]), {"cfg_interval": [1, 2]}, "cfg_interval must be a string"),
    (np.array([1]), {"first_index": -1}, "first_index must be in"),
    (np.array([1]), {"timeout_s": 0}, "timeout_s must be in"),
    (np.array([1] * 9), {}, "9 images in one request"),
    (None, {}, "exactly one of them"),
    (None, {"class_names": "a||b"}, "empty name"),
])
def test_from_wire_refuses_with_one_line(ids, params, says):
    with pytest.raises(WireError) as e:
        GenerateRequest.from_wire(ids, params, max_images=8)
    assert e.value.status == "INVALID_ARG" and says in str(e.value)
    assert decode_error("junk " + e.value.encode() + " junk") == ("INVALID_ARG", str(e.value))


def _in_sessions(batcher: RowBatcher, jobs: list) -> dict[int, object]:
    """Run ``jobs[i]()`` in threads, each inside a session opened before any starts (so the worker waits for all
    of them); returns each job's result or exception."""
    out: dict[int, object] = {}
    sessions = [batcher.session() for _ in jobs]
    for s in sessions:
        s.__enter__()

    def run(i: int) -> None:
        try:
            out[i] = jobs[i]()
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out[i] = e
        sessions[i].__exit__(None, None, None)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


@pytest.fixture(scope="module")
def digits():
    from ditdeploy.runtimes import load
    from ditdeploy.sources import shipped

    return load(shipped.default_model(), threads=1)


def test_rows_of_requests_at_different_steps_share_one_call_and_come_back_right(digits):
    """Three open sessions submit rows at three different timesteps: one call holds all of them (the worker waits
    for the open sessions), and each caller gets the rows a direct call gives (fp32 batch-shape noise only)."""
    from ditdeploy.proof.parity import THRESHOLDS

    b = RowBatcher({"plain": digits}, max_rows=16, max_delay_s=30.0)
    rng = np.random.default_rng(1)
    feeds = [(rng.standard_normal((n, 1, 8, 8), dtype=np.float32), np.full(n, t), np.arange(n) % 10)
             for n, t in ((1, 999), (2, 500), (3, 20))]
    got = _in_sessions(b, [lambda f=f: BatchedDenoiser(b, digits)(*f) for f in feeds])
    c = b.counters
    assert (c.calls, c.rows, c.max_rows, c.mixed_calls) == (1, 6, 6, 1)
    for i, (x, t, y) in enumerate(feeds):
        want = digits(x, t, y)
        assert np.linalg.norm(got[i] - want) / np.linalg.norm(want) < THRESHOLDS["fp32"].call_rel_l2
    b.close()
    with pytest.raises(Stopped):
        b.run("plain", *feeds[0])


def test_a_failing_submission_fails_alone():
    """A call that raises is retried per submission: the one with the bad row fails, the others get results."""

    def negate_unless_bad(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        if (y == 99).any():
            raise ValueError("bad row")
        return -x

    b = RowBatcher({"plain": negate_unless_bad}, max_rows=16, max_delay_s=30.0)
    ys = [np.array([1]), np.array([99]), np.array([2, 3])]
    out = _in_sessions(b, [lambda i=i, y=y: b.run("plain", np.full((len(y), 1, 2, 2), float(i + 1), np.float32),
                                                  np.zeros(len(y), np.int64), y) for i, y in enumerate(ys)])
    b.close()
    assert isinstance(out[1], ValueError)
    assert np.array_equal(out[0], np.full((1, 1, 2, 2), -1.0)) and np.array_equal(out[2], np.full((2, 1, 2, 2), -3.0))


# ------------------------------------------------------------------------------------------------ CLI, no server
def _cli(*args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "ditdeploy", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, says", [
    (["--server", "ftp://127.0.0.1:8000"], "expected http://HOST:PORT"),
    (["--server", "http://127.0.0.1:8000/v2"], "expected http://HOST:PORT"),
    (["--server", "http://127.0.0.1:8000", "--engine", "x.onnx"], "--server: --engine applies to a local run"),
    (["--server", "http://127.0.0.1:8000", "--threads", "2"], "--server: --threads applies to a local run"),
    (["--server", "http://127.0.0.1:8000", "--shards", "2", "--npz", "s.npz"], "--shards"),
])
def test_sample_server_bad_flags_are_one_line(args, says, tmp_path):
    r = _cli("sample", *args, "--out", str(tmp_path / "s.png"))
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(err) == 1 and err[0].startswith("error:") and says in err[0], r.stderr
    assert not (tmp_path / "s.png").exists()


def test_sample_server_unreachable_is_one_line(tmp_path):
    r = _cli("sample", "--server", f"http://127.0.0.1:{_closed_port()}", "--out", str(tmp_path / "s.png"))
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(err) == 1 and "cannot reach the server" in err[0], r.stderr
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("args, env, says", [
    (["--port", "9000", "--grpc-port", "9000"], {}, "must differ"),
    (["--max-queue", "0"], {}, "--max-queue"),
    (["--engine", "missing.onnx"], {}, "no such file: missing.onnx"),
    ([], {"DITDEPLOY_SERVE_PYTHON": "/nonexistent/python"}, "is not an executable file"),
])
def test_serve_bad_setup_is_one_line(args, env, says):
    r = _cli("serve", *args, env=env)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and says in r.stderr and len([ln for ln in err if ln.strip()]) <= 6, r.stderr
