"""`ditdeploy serve` against a real Triton Inference Server on 127.0.0.1 (PyTriton's bundled tritonserver, started
through the CLI from README's server environment) and `sample --server`: outputs equal to a local `sample`,
step-level batching across requests, bad input -> 400 with one line, admission limit -> 503, deadlines free slots,
SIGTERM stops everything (tritonserver, its stubs, the workspace). One server for the module (~30 s to start on a
loaded 2-core box); the SIGINT restart is marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import cmdline_of

from ditdeploy.run import generation
from ditdeploy.serving import client
from ditdeploy.serving.protocol import GenerateRequest

READY_TIMEOUT_S = 240
MAX_BATCH = 8
MAX_QUEUE = 3


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Server:
    """A `ditdeploy serve` process: its URL, the process and every descendant seen while it ran."""

    def __init__(self, *extra: str):
        self.tmp = Path(tempfile.mkdtemp(prefix="dds-", dir="/tmp"))  # short: PyTriton's unix sockets live here
        http, grpc, metrics = _free_ports(3)
        self.url = f"http://127.0.0.1:{http}"
        self.grpc = f"127.0.0.1:{grpc}"
        self.metrics = f"http://127.0.0.1:{metrics}/metrics"
        env = {**os.environ, "TMPDIR": str(self.tmp), "DITDEPLOY_NO_PROGRESS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ditdeploy", "serve", "--port", str(http), "--grpc-port", str(grpc),
             "--metrics-port", str(metrics), "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
             "--threads", "1", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(READY_TIMEOUT_S):
            self.kill()
            raise AssertionError(f"server not ready in {READY_TIMEOUT_S} s: {self.lines} {self.proc.stderr.read()}")
        self.family = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        # what each Python-backend stub holds outside TMPDIR: its model folder (/tmp/folderXXXXXX) and shm region
        self.stub_files = [p for argv in (cmdline_of(q) for q in self.family[1:])
                           if argv and argv[0].endswith("triton_python_backend_stub")
                           for p in (Path(argv[1]).parent.parent, Path("/dev/shm", argv[2]))]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("ready: "):
                self.ready.set()

    def stop(self, sig: int) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=120)
        return rc, time.monotonic() - t0

    def left_running(self) -> list[str]:
        alive = []
        for p in self.family:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {p.name()}")
            except psutil.NoSuchProcess:
                pass
        return alive

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for p in getattr(self, "family", []):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    if s.proc.poll() is None:
        s.kill()
    shutil.rmtree(s.tmp, ignore_errors=True)


def _post(url: str, model: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _gen_body(labels: list[int], **params) -> dict:
    return {"parameters": params,
            "inputs": [{"name": "labels", "datatype": "INT64", "shape": [len(labels)], "data": labels}]}


def _left_in(tmp: Path) -> list[str]:
    """What a run left in its TMPDIR, less ONNX Runtime's own `.ses` file (it writes one to $TMPDIR on load)."""
    return [p.name for p in tmp.iterdir() if p.name != ".ses"]


def _stats(url: str) -> dict:
    return client.server_info(url).raw["stats"]


def _local(labels: list[int], first_index: int = 0, **settings) -> np.ndarray:
    """The uint8 images a local `sample` makes for these labels at these global indices (the shipped model)."""
    from ditdeploy.run import images
    from ditdeploy.runtimes import load
    from ditdeploy.sources import shipped

    req = generation.SampleRequest(out=None, **settings)
    den = load(shipped.default_model(), threads=1)
    cfg = req.cfg_scale if req.cfg_scale is not None else generation.default_cfg(den.config)
    idx = np.arange(first_index, first_index + len(labels), dtype=np.int64)
    return images.to_uint8(generation.sample_batch(den, req, cfg, np.asarray(labels, np.int64), idx))


# ------------------------------------------------------------------------------------------------ outputs
def test_sample_server_equals_local_sample(server, tmp_path):
    """`sample --server` writes the same npz (labels, images) as a local `sample` with the same flags; batches of
    at most --max-batch / 2 images (guided) travel as separate requests, a few in flight."""
    flags = ["--labels", "3,7", "--num-per-label", "3", "--steps", "12", "--seed", "5", "--no-progress"]
    remote = subprocess.run([sys.executable, "-m", "ditdeploy", "sample", "--server", server.url, *flags,
                             "--npz", str(tmp_path / "srv.npz"), "--out", str(tmp_path / "srv.png")],
                            capture_output=True, text=True, timeout=300)
    assert remote.returncode == 0, remote.stderr
    assert f"sampled 6 image(s) on server {server.url}" in remote.stderr and "| server requests " in remote.stderr
    local = subprocess.run([sys.executable, "-m", "ditdeploy", "sample", *flags, "--threads", "1",
                            "--npz", str(tmp_path / "loc.npz"), "--no-out"], capture_output=True, text=True,
                           timeout=300)
    assert local.returncode == 0, local.stderr
    a, b = np.load(tmp_path / "srv.npz"), np.load(tmp_path / "loc.npz")
    assert a["labels"].tolist() == b["labels"].tolist() == [3, 3, 3, 7, 7, 7]
    # ORT fp32 at another batch shape may round differently: at most one uint8 level, on few pixels
    diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert (tmp_path / "srv.png").stat().st_size > 0


def test_generate_image_follows_the_noise_contract(server):
    """The image for (label, seed, global index) is the local one; first_index moves it along the index."""
    req = GenerateRequest(labels=[4, "9"], first_index=7,
                          sampling=generation.SampleRequest(out=None, steps=8, seed=11, cfg_scale=2.5))
    imgs, labels = client.generate(server.url, req)
    assert labels.tolist() == [4, 9] and imgs.dtype == np.uint8 and imgs.shape == (2, 8, 8, 1)
    want = _local([4, 9], first_index=7, steps=8, seed=11, cfg_scale=2.5)
    assert np.abs(imgs.astype(int) - want.astype(int)).max() <= 1
    other = _local([4, 9], first_index=0, steps=8, seed=11, cfg_scale=2.5)
    assert np.abs(imgs.astype(int) - other.astype(int)).max() > 16  # another index is another image


def test_denoise_model_equals_the_artifact(server):
    """`denoise` returns the artifact's own output for x, t, y (rows batched with whatever else is in flight)."""
    from ditdeploy.proof.parity import THRESHOLDS
    from ditdeploy.runtimes import load
    from ditdeploy.sources import shipped

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 8, 8), dtype=np.float32)
    t, y = np.array([0, 500, 999]), np.array([1, 10, 4])
    code, body = _post(server.url, "denoise", {"inputs": [
        {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()},
        {"name": "t", "datatype": "INT64", "shape": [3], "data": t.tolist()},
        {"name": "y", "datatype": "INT64", "shape": [3], "data": y.tolist()}]})
    assert code == 200, body
    got = np.asarray(body["outputs"][0]["data"], np.float32).reshape(body["outputs"][0]["shape"])
    want = load(shipped.default_model(), threads=1)(x, t, y)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert got.shape == (3, 2, 8, 8) and rel < THRESHOLDS["fp32"].call_rel_l2, rel


# ------------------------------------------------------------------------------------------------ batching
def test_requests_at_different_steps_share_denoiser_calls(server):
    """Two requests sent together with different step counts (so different timesteps at almost every step) run in
    shared calls: fewer calls than their steps added up, calls that mix timesteps, each output still its own."""
    before = _stats(server.url)["denoiser"]
    reqs = [GenerateRequest(labels=[1], sampling=generation.SampleRequest(out=None, steps=80, seed=1)),
            GenerateRequest(labels=[2, 6], sampling=generation.SampleRequest(out=None, steps=50, seed=2))]
    out: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, client.generate(server.url, reqs[i])[0]))
               for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    after = _stats(server.url)["denoiser"]
    calls, rows = after["calls"] - before["calls"], after["rows"] - before["rows"]
    assert rows == 80 * 2 + 50 * 4  # guided: 2 rows per image per step
    assert calls < 80 + 50 and after["mixed_calls"] > before["mixed_calls"], (calls, after)
    assert np.abs(out[0].astype(int) - _local([1], steps=80, seed=1).astype(int)).max() <= 1
    assert np.abs(out[1].astype(int) - _local([2, 6], steps=50, seed=2).astype(int)).max() <= 1


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("body, says", [
    ({"inputs": [{"name": "labels", "datatype": "FP32", "shape": [1], "data": [3.0]}]}, "data-type"),
    ({"inputs": [{"name": "labels", "datatype": "INT64", "shape": [1, 1], "data": [3]}]}, "shape"),
    ({"parameters": {"class_names": "3|cat"}, "inputs": []}, "unknown class name 'cat'"),
    ({"parameters": {"class_names": "3"}, "inputs": _gen_body([3])["inputs"]}, "exactly one of them"),
    ({"parameters": {"class_names": "3|" * 10**6}, "inputs": []}, "class_names must be a string of at most"),
    (_gen_body([3], steps=0), "--steps must be in 1..1000"),
    (_gen_body([3], steps=10**6), "--steps must be in 1..1000"),
    (_gen_body([3] * 10**6), "1000000 images in one request"),
    (_gen_body([3] * 5), "need 10 rows per step"),
    (_gen_body([3], cfg_scale=float("nan")), "cfg_scale must be a finite number"),
    (_gen_body([3], cfg_interval="9,1"), "cfg interval"),
    (_gen_body([3], sampler="euler"), "unknown sampler"),
    (_gen_body([3], frobnicate=1), "unknown parameter(s) frobnicate"),
    (_gen_body([11]), "out of range"),
    (_gen_body([-1]), "out of range"),
    (_gen_body([3], cache_interval=2), "cannot reuse features"),
])
def test_bad_generate_request_is_a_400_with_one_line(server, body, says):
    code, answer = _post(server.url, "generate", body)
    msg = answer["error"]
    assert 400 <= code < 500 and says in msg and "\n" not in msg and "Traceback" not in msg, (code, msg)


def test_bad_denoise_request_is_a_400_and_the_server_stays_up(server):
    bad_t = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64},
                        {"name": "t", "datatype": "INT64", "shape": [1], "data": [5000]},
                        {"name": "y", "datatype": "INT64", "shape": [1], "data": [3]}]}
    code, answer = _post(server.url, "denoise", bad_t)
    assert code == 400 and answer["error"] == "t must lie in 0..999, got 5000..5000"
    wrong_size = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": [0.0] * 16},
                             {"name": "t", "datatype": "INT64", "shape": [1], "data": [5]},
                             {"name": "y", "datatype": "INT64", "shape": [1], "data": [3]}]}
    code, answer = _post(server.url, "denoise", wrong_size)
    assert code == 400 and "shape" in answer["error"], answer
    imgs, _ = client.generate(server.url, GenerateRequest(labels=[5], sampling=generation.SampleRequest(
        out=None, steps=4)))
    assert imgs.shape == (1, 8, 8, 1)


# ------------------------------------------------------------------------------------------------ load
def _wait_in_flight(url: str, n: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while _stats(url)["in_flight"] != n:
        assert time.monotonic() < end, f"in_flight never reached {n}"
        time.sleep(0.05)


def test_more_than_max_queue_is_refused_at_once_and_the_rest_finish(server):
    long = generation.SampleRequest(out=None, steps=400, seed=3)
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = client.generate(server.url, GenerateRequest(labels=[i], sampling=long), busy_retry_s=0)
        except client.ServerError as e:
            results[i] = e

    held = [threading.Thread(target=run, args=(i,)) for i in range(MAX_QUEUE)]
    for th in held:
        th.start()
    _wait_in_flight(server.url, MAX_QUEUE)
    t0 = time.monotonic()
    with pytest.raises(client.ServerError) as refused:
        client.generate(server.url, GenerateRequest(labels=[9], sampling=long), busy_retry_s=0)
    waited = time.monotonic() - t0
    assert refused.value.status == 503 and "server busy" in str(refused.value)
    assert waited < 10, waited  # refused, not queued behind 400-step requests (generous for a loaded box)
    for th in held:
        th.join()
    assert all(isinstance(results[i], tuple) for i in range(MAX_QUEUE)), results
    assert _stats(server.url)["refused"] >= 1


def _send_raw(url: str, body: dict) -> socket.socket:
    """POST a generate request on a bare socket (so the test can hang up without reading the answer)."""
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v2/models/generate/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    return s


def test_a_request_past_its_deadline_frees_its_slot_and_fails_alone(server):
    """Triton's HTTP endpoint does not tell a model that its client went away (request cancellation is gRPC /
    C API only), so a request's deadline (timeout_s) frees its slot: a 1000-step request with a 0.2 s deadline
    is answered 503 with the reason; one whose client hung up is dropped the same way while the request running
    beside it in the same calls finishes, correct."""
    before = _stats(server.url)
    with _send_raw(server.url, _gen_body([0, 1, 2, 3], steps=1000, timeout_s=0.2)) as s:
        s.settimeout(120)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 503") and b"exceeded its timeout_s=0.2 s" in answer, answer[:300]
    with _send_raw(server.url, _gen_body([0, 1, 2, 3], steps=1000, timeout_s=0.5)):
        time.sleep(0.2)  # hang up before the answer
    neighbour = GenerateRequest(labels=[8], sampling=generation.SampleRequest(out=None, steps=30, seed=4))
    imgs, _ = client.generate(server.url, neighbour)
    assert np.abs(imgs.astype(int) - _local([8], steps=30, seed=4).astype(int)).max() <= 1
    end = time.monotonic() + 60
    while _stats(server.url)["failed"] < before["failed"] + 2:
        assert time.monotonic() < end, _stats(server.url)
        time.sleep(0.1)
    after = _stats(server.url)
    assert after["in_flight"] == 0 and after["completed"] == before["completed"] + 1


_GRPC_CLIENT_GOES_AWAY = """
import json, os, sys, time, urllib.request
import numpy as np
import tritonclient.grpc as g

grpc_url, http_url = sys.argv[1:3]
c = g.InferenceServerClient(grpc_url)
inp = g.InferInput("labels", [1], "INT64")
inp.set_data_from_numpy(np.array([0], np.int64))
c.async_infer("generate", [inp], callback=lambda r, e: None, parameters={"steps": 1000})
body = json.dumps({"inputs": [{"name": "query", "datatype": "INT64", "shape": [1], "data": [0]}]}).encode()
end = time.monotonic() + 120
while time.monotonic() < end:
    r = urllib.request.urlopen(urllib.request.Request(http_url + "/v2/models/info/infer", data=body))
    if json.loads(json.loads(r.read())["outputs"][0]["data"][0])["stats"]["in_flight"] == 1:
        os._exit(0)  # mid-request, without a goodbye
    time.sleep(0.05)
os._exit(3)
"""


def test_a_grpc_client_that_goes_away_frees_its_slot_at_once(server):
    """A gRPC client that exits mid-request: Triton marks the request cancelled, the proxy tells the server, the
    request's rows leave the batch at the next step (counted failed, not completed) and its slot is free."""
    from ditdeploy.serving import env

    before = _stats(server.url)
    r = subprocess.run([str(env.server_python()), "-c", _GRPC_CLIENT_GOES_AWAY, server.grpc, server.url],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    _wait_in_flight(server.url, 0, timeout=60)
    after = _stats(server.url)
    assert (after["failed"], after["completed"]) == (before["failed"] + 1, before["completed"])


# ------------------------------------------------------------------------------------------------ stop
def test_sigterm_stops_tritonserver_every_worker_and_the_workspace(server):
    """Last in this module: the server's whole process tree goes, the workspace under TMPDIR too, exit 143."""
    names = {p.name() for p in server.family}
    assert any("tritonserver" in n for n in names) and any("triton_python" in n for n in names), names
    assert _left_in(server.tmp)  # the workspace exists while it runs
    assert server.stub_files and all(p.exists() for p in server.stub_files)
    rc, took = server.stop(signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM
    assert server.left_running() == []
    assert _left_in(server.tmp) == []
    assert [str(p) for p in server.stub_files if p.exists()] == []


@pytest.mark.slow
def test_sigint_stops_cleanly_with_130_while_a_request_runs():
    """Ctrl-C with a long request in flight: the request ends with an error at once (not after it finishes),
    everything goes, exit 130."""
    s = Server()
    try:
        failed: list[Exception] = []

        def long_request() -> None:
            try:
                client.generate(s.url, GenerateRequest(labels=[1], sampling=generation.SampleRequest(
                    out=None, steps=1000)), busy_retry_s=0)
            except (client.ServerError, OSError) as e:
                failed.append(e)

        th = threading.Thread(target=long_request)
        th.start()
        _wait_in_flight(s.url, 1)
        rc, took = s.stop(signal.SIGINT)
        th.join(timeout=60)
        assert rc == 130 and s.left_running() == [] and _left_in(s.tmp) == []
        assert len(failed) == 1, failed
    finally:
        s.kill()


@pytest.mark.slow
def test_tritonserver_killed_by_a_request_is_started_again():
    """tritonserver 2.51 segfaults parsing a JSON BYTES input of 10^6 elements (for any model, before any check):
    the server starts it again on the same ports with the loaded model, and it answers again."""
    s = Server()
    try:
        n = 10**6
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _post(s.url, "info", {"inputs": [{"name": "query", "datatype": "BYTES", "shape": [n],
                                              "data": ["3"] * n}]})
        end = time.monotonic() + READY_TIMEOUT_S
        while sum(line.startswith("ready: ") for line in s.lines) < 2:
            assert time.monotonic() < end and s.proc.poll() is None, s.lines
            time.sleep(0.5)
        imgs, _ = client.generate(s.url, GenerateRequest(labels=[2], sampling=generation.SampleRequest(
            out=None, steps=4)))
        assert imgs.shape == (1, 8, 8, 1)
        rc, _ = s.stop(signal.SIGTERM)
        assert rc == 143 and _left_in(s.tmp) == []
    finally:
        s.kill()


@pytest.mark.slow
def test_latent_artifact_is_served_with_its_vae_decoder(tmp_path_factory, tmp_path):
    """A latent model whose manifest names its VAE decoder: the server decodes (batched) and `sample --server`
    writes what a local `sample --engine` writes."""
    from tests import rt_artifacts

    art = rt_artifacts.latent_artifacts(tmp_path_factory.getbasetemp() / "rt")
    s = Server("--engine", str(art["onnx"]))
    try:
        flags = ["--labels", "0,4", "--num-per-label", "2", "--steps", "6", "--seed", "2", "--no-progress", "--no-out"]
        remote = subprocess.run([sys.executable, "-m", "ditdeploy", "sample", "--server", s.url, *flags,
                                 "--npz", str(tmp_path / "srv.npz")], capture_output=True, text=True, timeout=300)
        assert remote.returncode == 0, remote.stderr
        local = subprocess.run([sys.executable, "-m", "ditdeploy", "sample", "--engine", str(art["onnx"]), *flags,
                                "--threads", "1", "--npz", str(tmp_path / "loc.npz")], capture_output=True,
                               text=True, timeout=300)
        assert local.returncode == 0, local.stderr
        a, b = np.load(tmp_path / "srv.npz"), np.load(tmp_path / "loc.npz")
        assert a["arr_0"].shape == b["arr_0"].shape == (4, 32, 32, 3)
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1
        assert _stats(s.url)["decoder"]["rows"] == 4
    finally:
        s.kill()
