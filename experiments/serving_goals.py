"""The serving goals of issue 19, measured in one run on one machine (``python -m experiments.serving_goals``).

1. ``ditdeploy serve`` (digits by default) under C concurrent ``generate`` clients (DDIM 50, cfg 4): the same C
   requests sent one after another and then all at once, alternating for a few rounds (the ratio per round: the
   load of a shared machine drifts between runs), and a closed loop of C clients for ``--duration`` against C
   sequential requests; the mean denoiser batch (rows per call, from the server's counters);
2. Poisson arrivals at 70 % of the capacity measured in 1 (requests/s = images/s, one image per request): p99
   latency against the latency of a single request on the idle server (the sequential run's p50), time to
   admission p99 when the server reports it.

Optionally (``--triton-repo``) the same two runs against the repository ``export --fmt triton`` writes, on PyTriton's
bundled tritonserver (``--model-config-name python``), and ``--engine`` for another artifact (e.g. XL/2 random
weights on ONNX Runtime with ``--concurrency 4``). Writes ``<out>.json`` (runs, settings, machine, load average
before/after), a latency-vs-load plot per server (``<out>_serve.png``, ``<out>_triton_repo.png``) and prints the
``bench --server`` tables. Every server is started on 127.0.0.1 and stopped here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FRACTIONS = (0.35, 0.7, 0.9)  # Poisson rates as fractions of the measured capacity (0.7: the goal's)

def start_serve(engine: str | None, port: int, max_batch: int, max_queue: int, extra: list[str]) -> subprocess.Popen:
    """``ditdeploy serve`` on 127.0.0.1:port; returns once its ready line is printed."""
    cmd = [sys.executable, "-m", "ditdeploy", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--max-queue", str(max_queue), *(["--engine", engine] if engine else []), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("ready:"):
            return proc
        if time.monotonic() > deadline:
            break
    stop(proc)
    raise RuntimeError(f"ditdeploy serve did not print its ready line (exit {proc.returncode})")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def interleaved(url: str, n: int, rounds: int, steps: int, cfg: float, seed: int, say: Any,
                metrics_url: str | None = None) -> dict[str, Any]:
    """The goal's own comparison, robust to a shared machine's drifting load: the same ``n`` requests (same labels
    and seeds) sent one after another, then all at once (n clients, one request each), alternating for
    ``rounds`` rounds; per round the throughput ratio, and the burst's mean denoiser batch."""
    import statistics

    from ditdeploy.bench import load

    spec = load.LoadSpec(url=url, seed=seed, steps=steps, cfg_scale=cfg, metrics_url=metrics_url)
    load.check_ready(url)
    send = load.http_sender(spec)
    counters = load.Counters(url, metrics_url or load.default_metrics_url(url))
    out: list[dict[str, Any]] = []
    for r in range(rounds):
        row = {}
        for name, clients in (("sequential", 1), ("burst", n)):
            before = counters.read()
            outcomes, wall = load.run_closed(send, clients, float("inf"), max_requests=n)
            row[name] = load.summarize(outcomes, wall, None, load.delta(before, counters.read()))
        row["ratio"] = row["burst"]["images_per_s"] / row["sequential"]["images_per_s"]
        say(f"round {r + 1}: sequential {row['sequential']['images_per_s']:.2f} img/s, {n} at once "
            f"{row['burst']['images_per_s']:.2f} img/s: {row['ratio']:.2f}x, mean batch "
            f"{(row['burst'].get('denoiser') or {}).get('mean_batch') or float('nan'):.2f}")
        out.append(row)
    ratios = [r["ratio"] for r in out]
    batches = [(r["burst"].get("denoiser") or {}).get("mean_batch") for r in out]
    return {"rounds": out, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "burst_mean_batch_median": statistics.median([b for b in batches if b] or [0])}


def goals(url: str, concurrency: int, duration: float, steps: int, cfg: float, seed: int,
          say: Any, metrics_url: str | None = None, rounds: int = 3, sweep: bool = True) -> dict[str, Any]:
    """Run 1 (closed loop vs sequential), the interleaved same-requests comparison, and run 2 (Poisson at 70 % of
    run 1's capacity) against ``url``."""
    from ditdeploy.bench import load

    same = interleaved(url, concurrency, rounds, steps, cfg, seed, say, metrics_url)
    if not sweep:
        return {"interleaved": same, "goals": {
            "same_requests_throughput_vs_sequential_median": same["ratio_median"],
            "same_requests_mean_denoiser_batch_median": same["burst_mean_batch_median"]}}

    clients = sorted({max(1, concurrency // 4), concurrency})
    closed = load.run_load(load.LoadSpec(url=url, concurrencies=clients, duration=duration, seed=seed,
                                         steps=steps, cfg_scale=cfg, baseline=concurrency, metrics_url=metrics_url),
                           say=say)
    seq, conc = closed["runs"][0], closed["runs"][-1]
    capacity = conc["images_per_s"]
    rates = [round(f * capacity, 4) for f in FRACTIONS]
    poisson = load.run_load(load.LoadSpec(url=url, rates=rates, duration=duration, seed=seed + 1,
                                          steps=steps, cfg_scale=cfg, baseline=max(4, concurrency // 2),
                                          metrics_url=metrics_url), say=say)
    pidle, prate = poisson["runs"][0], poisson["runs"][1 + FRACTIONS.index(0.7)]
    rate = rates[FRACTIONS.index(0.7)]
    return {
        "interleaved": same, "closed_loop": closed, "poisson": poisson,
        "goals": {
            "same_requests_throughput_vs_sequential_median": same["ratio_median"],
            "same_requests_mean_denoiser_batch_median": same["burst_mean_batch_median"],
            "throughput_vs_sequential": conc["images_per_s"] / seq["images_per_s"],
            "mean_denoiser_batch": (conc.get("denoiser") or {}).get("mean_batch"),
            "capacity_images_per_s": capacity, "poisson_rate_per_s": rate,
            "p99_vs_idle_latency": prate["latency_s"]["p99"] / pidle["latency_s"]["p50"],
            "admission_p99_s": prate["admission_s"]["p99"],
            "mean_denoiser_call_s": (prate.get("denoiser") or {}).get("mean_call_s"),
            "admission_p99_in_calls": _ratio(prate["admission_s"]["p99"],
                                             (prate.get("denoiser") or {}).get("mean_call_s")),
        },
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write (bench/results/...).")
    ap.add_argument("--engine", default=None, help="Artifact to serve (default: the shipped digits model).")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=18400)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--triton-repo", type=Path, default=None,
                    help="Also measure this exported repository on PyTriton's tritonserver (python variant); "
                         "written from the served ONNX (one generate instance per client) when it does not exist.")
    ap.add_argument("--serve-arg", action="append", default=[], help="Extra `ditdeploy serve` argument.")
    ap.add_argument("--rounds", type=int, default=3, help="Rounds of the interleaved same-requests comparison.")
    ap.add_argument("--no-sweep", action="store_true", help="Only the interleaved comparison (big models).")
    a = ap.parse_args(argv)
    from ditdeploy.artifact.files import write_json_atomic
    from ditdeploy.bench.machine import machine_info

    def say(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    result: dict[str, Any] = {"kind": "serving-goals", "argv": sys.argv[1:], "loadavg_before": os.getloadavg(),
                              "servers": {}}
    proc = start_serve(a.engine, a.port, a.max_batch, max(4, 2 * a.concurrency), a.serve_arg)
    try:
        say(f"ditdeploy serve on port {a.port}")
        result["servers"]["ditdeploy serve"] = goals(f"http://127.0.0.1:{a.port}", a.concurrency, a.duration,
                                                     a.steps, a.cfg_scale, a.seed, say, rounds=a.rounds,
                                                     sweep=not a.no_sweep)
    finally:
        stop(proc)
    if a.triton_repo is not None:
        from ditdeploy.export.triton_repo import RepoOptions, write_repository
        from ditdeploy.serving.triton_local import LocalTriton, ServerEnv
        from ditdeploy.sources.shipped import DIGITS_ONNX

        if not a.triton_repo.exists():  # the shipped digits model, one generate instance per client
            write_repository(a.engine or DIGITS_ONNX, a.triton_repo,
                             options=RepoOptions(max_batch=a.max_batch, instances=a.concurrency))

        with LocalTriton(ServerEnv.probe(), a.triton_repo, config_name="python") as t:
            say(f"Triton repository {a.triton_repo} at {t.http}")
            result["servers"]["triton repository (python variant)"] = goals(
                t.http, a.concurrency, a.duration, a.steps, a.cfg_scale, a.seed, say, metrics_url=t.metrics,
                rounds=a.rounds, sweep=not a.no_sweep)
    result["loadavg_after"] = os.getloadavg()
    result["machine"] = machine_info()
    write_json_atomic(a.out, result)
    from ditdeploy.bench import load

    for name, g in result["servers"].items():  # latency vs load: the closed-loop and Poisson runs of each server
        if "closed_loop" not in g:
            continue
        runs = g["closed_loop"]["runs"] + g["poisson"]["runs"][1:]
        png = a.out.with_name(f"{a.out.stem}_{'serve' if name.startswith('ditdeploy') else 'triton_repo'}.png")
        load.write_plot({"runs": runs}, png)
    print(json.dumps({k: v["goals"] for k, v in result["servers"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
