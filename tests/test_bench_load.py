"""``bench --server`` load test: its statistics against hand computations, the seeded Poisson arrivals, the two
drivers' scheduling, and Triton's metrics text."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ditdeploy.bench.load import (
    Outcome,
    default_metrics_url,
    delta,
    percentile,
    poisson_arrivals,
    run_closed,
    run_open,
    summarize,
    triton_counts,
)


def test_percentile_by_hand_and_against_numpy():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)  # between the 2nd and 3rd of 1,2,3,4
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)  # rank 0.9*3 = 2.7: 3 + 0.7*(4-3)
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None
    xs = np.random.default_rng(0).exponential(size=101)
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(list(xs), q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def test_summary_numbers_by_hand():
    outs = [Outcome(0, arrival=0.0, sent=0.0, done=1.0, admission_s=0.1),
            Outcome(1, arrival=0.5, sent=0.5, done=2.5, admission_s=0.3),
            Outcome(2, arrival=1.0, sent=1.0, done=4.0),
            Outcome(3, arrival=1.5, sent=1.5, done=1.6, status="refused", images=0, error="busy"),
            Outcome(4, arrival=2.0, sent=2.0, done=2.1, status="error", images=0, error="boom")]
    s = summarize(outs, wall_s=4.0, slo_s=2.0, counted={"rows": 120.0, "calls": 15.0, "busy_s": 0.3})
    assert (s["requests"], s["completed"], s["refused"], s["errors"], s["images"]) == (5, 3, 1, 1, 3)
    assert s["images_per_s"] == pytest.approx(3 / 4.0)
    # latencies 1.0, 2.0, 3.0 (done - arrival of the completed ones)
    assert s["latency_s"]["p50"] == pytest.approx(2.0) and s["latency_s"]["p90"] == pytest.approx(2.8)
    assert s["latency_s"]["p99"] == pytest.approx(2.98) and s["latency_s"]["mean"] == pytest.approx(2.0)
    assert s["admission_s"]["p50"] == pytest.approx(0.2) and s["admission_s"]["reported"] == 2
    # SLO 2 s: requests 0 and 1 meet it; the refused and failed ones count as misses: 2 of 5
    assert s["slo"] == {"latency_s": 2.0, "met": 2, "attainment": pytest.approx(0.4)}
    assert s["denoiser"] == {"rows": 120.0, "calls": 15.0, "mean_batch": pytest.approx(8.0),
                             "mean_call_s": pytest.approx(0.02)}
    assert s["error_messages"] == ["boom", "busy"]


def test_poisson_arrivals_are_seeded_and_have_the_rate():
    a = poisson_arrivals(50.0, 40.0, seed=3)
    assert a == poisson_arrivals(50.0, 40.0, seed=3) and a != poisson_arrivals(50.0, 40.0, seed=4)
    assert all(0 < x < 40.0 for x in a) and a == sorted(a)
    # count ~ Poisson(2000): sd 44.7; 5 sd bounds cannot fail by chance in practice and catch a wrong rate (x2)
    assert abs(len(a) - 2000) < 5 * 2000 ** 0.5
    gaps = np.diff([0.0, *a])
    assert abs(gaps.mean() - 1 / 50.0) < 5 * (1 / 50.0) / len(gaps) ** 0.5  # exponential: sd of the mean = mean/sqrt(n)
    with pytest.raises(Exception, match="--rate"):
        poisson_arrivals(0, 10, 0)


def _gate(hold: float = 0.02):
    """A send() that records how many calls are in flight at once and holds each for ``hold`` seconds."""
    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    def send(i: int):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(hold)
        with lock:
            state["now"] -= 1
        if i == 3:
            raise RuntimeError("request 3 failed")
        return "ok", 1, None, None

    return send, state


def test_closed_loop_keeps_c_in_flight_and_stops_by_itself():
    send, state = _gate()
    outs, wall = run_closed(send, concurrency=3, duration=0.3)
    assert state["max"] == 3  # never more than C clients at once, and all C were used
    assert [o.index for o in outs] == list(range(len(outs))) and len(outs) >= 3
    assert all(o.sent < 0.3 for o in outs)  # nothing started after the duration
    assert outs[3].status == "error" and "request 3 failed" in outs[3].error  # a failure is recorded, not raised
    assert wall == max(o.done for o in outs)
    outs, _ = run_closed(send, concurrency=2, duration=float("inf"), max_requests=5)  # the sequential baseline form
    assert len(outs) == 5


def test_open_loop_sends_at_the_arrival_times():
    send, state = _gate(hold=0.5)  # long enough that a loaded machine still starts the four together
    arrivals = [0.0, 0.0, 0.0, 0.0, 0.05]
    outs, _ = run_open(send, arrivals)
    assert [o.arrival for o in outs] == arrivals
    assert state["max"] >= 4  # arrivals are not serialised behind slow answers
    assert all(o.latency >= o.done - o.sent for o in outs)  # latency counts from the scheduled arrival


def test_triton_metrics_counts():
    text = """# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{model="generate",version="1"} 16
nv_inference_count{model="denoise",version="1"} 1600
nv_inference_count{model="denoise",version="2"} 40
nv_inference_exec_count{model="denoise",version="1"} 150
nv_inference_exec_count{model="denoise",version="2"} 10
nv_inference_exec_count{model="generate",version="1"} 16
nv_inference_compute_infer_duration_us{model="denoise",version="1"} 2500000
"""
    assert triton_counts(text) == {"rows": 1640.0, "calls": 160.0, "busy_s": 2.5}
    assert triton_counts(text, "generate") == {"rows": 16.0, "calls": 16.0}
    assert delta({"rows": 10.0, "calls": 2.0}, {"rows": 50.0, "calls": 7.0, "busy_s": 1.0}) == {"rows": 40.0,
                                                                                                "calls": 5.0}
    assert triton_counts(text, "vae_decoder") is None


def test_default_metrics_url():
    assert default_metrics_url("http://127.0.0.1:8000") == "http://127.0.0.1:8002/metrics"
    assert default_metrics_url("localhost:9100/") == "http://localhost:9102/metrics"


@pytest.mark.parametrize("args,words", [
    (["--rate", "0"], "--rate"),
    (["--rate", "2,x"], "--rate"),
    (["--concurrency", "-3"], "--concurrency"),
    ([], "--rate R and/or --concurrency C"),
    (["--rate", "1000", "--duration", "100"], "lower the rate"),
    (["--concurrency", "2", "--engine", "x.onnx"], "drop --engine"),
])
def test_bench_server_refuses_bad_flags_before_any_request(args, words):
    from tests.conftest import assert_one_line_error, run_main

    code, _, err = run_main(["bench", "--server", "http://127.0.0.1:9", *args])  # port 9: nothing listens
    assert_one_line_error(code, err, words)


def test_unreachable_server_is_one_line_before_any_run():
    from tests.conftest import assert_one_line_error, run_main

    code, out, err = run_main(["bench", "--server", "http://127.0.0.1:9", "--concurrency", "2", "--duration", "1"])
    assert_one_line_error(code, err, ["http://127.0.0.1:9", "not ready"])
    assert "sequential" not in out  # no run was started


def test_rate_without_server_is_refused():
    from tests.conftest import assert_one_line_error, run_main

    code, _, err = run_main(["bench", "--rate", "2"])
    assert_one_line_error(code, err, "--server")


# ------------------------------------------------------------------------------------------ against real servers
def _server_or_skip():
    from ditdeploy.serving.env import ServeEnvError, server_python

    try:
        server_python()
    except ServeEnvError as e:
        pytest.skip(str(e))


def _check_run(run: dict, steps: int) -> None:
    """The server's counters agree with what the client sent: every completed one-image request guided at
    cfg 4 put 2 rows into each of its ``steps`` denoiser calls."""
    assert run["completed"] == run["requests"] > 0 and run["errors"] == run["refused"] == 0
    d = run["denoiser"]
    assert d["rows"] == run["completed"] * steps * 2
    assert d["mean_batch"] == pytest.approx(d["rows"] / d["calls"])


def test_bench_server_against_ditdeploy_serve(tmp_path):
    """bench --server on a real `ditdeploy serve` (127.0.0.1, started and stopped here): JSON, table and plot."""
    import json

    from experiments.serving_goals import start_serve, stop
    from tests.conftest import run_main

    _server_or_skip()
    from ditdeploy.serving.triton_local import free_port

    port = free_port()
    proc = start_serve(None, port, max_batch=16, max_queue=8, extra=[])
    try:
        code, out, err = run_main(["bench", "--server", f"http://127.0.0.1:{port}", "--concurrency", "4",
                                   "--duration", "3", "--baseline", "2", "--steps", "5", "--slo", "60",
                                   "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    finally:
        stop(proc)
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["counter_source"] == "info" and [x["mode"] for x in r["runs"]] == ["sequential", "concurrency"]
    seq, conc = r["runs"]
    assert seq["requests"] == 2
    for run in (seq, conc):
        _check_run(run, 5)
    assert seq["denoiser"]["mean_batch"] == pytest.approx(2.0)  # one request at a time: its own 2 rows per call
    # admission reported by the server for every request, and it comes before the answer
    assert conc["admission_s"]["reported"] == conc["completed"] and seq["admission_s"]["reported"] == 2
    for run in (seq, conc):
        assert 0 <= run["admission_s"]["p99"] <= run["latency_s"]["max"]
    assert conc["denoiser"]["mean_batch"] > 2.0  # four clients' rows share calls
    assert conc["slo"]["attainment"] == 1.0 and "loadavg_before" in r["machine"]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "concurrency 4" in out


def test_bench_server_against_the_triton_repository(tmp_path):
    """The exported repository on PyTriton's tritonserver: counters from Triton's metrics (denoise model)."""
    from ditdeploy.bench import load
    from ditdeploy.export.triton_repo import RepoOptions, write_repository
    from ditdeploy.serving.triton_local import LocalTriton, ServerEnv
    from ditdeploy.sources.shipped import DIGITS_ONNX

    _server_or_skip()
    write_repository(DIGITS_ONNX, tmp_path / "repo", options=RepoOptions(instances=4))
    with LocalTriton(ServerEnv.probe(), tmp_path / "repo") as t:
        r = load.run_load(load.LoadSpec(url=t.http, rates=[4.0], duration=2.0, steps=5, baseline=2,
                                        metrics_url=t.metrics))
    assert r["counter_source"] == "metrics"
    for run in r["runs"]:
        _check_run(run, 5)
    assert r["runs"][1]["requests"] == len(load.poisson_arrivals(4.0, 2.0, 0))  # the seeded arrivals, all sent
