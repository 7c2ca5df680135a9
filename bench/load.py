"""``ditdeploy bench --server URL``: a load test of a running ``generate`` server.

The server is ``ditdeploy serve``, or the repository ``export --fmt triton`` writes, on any tritonserver.

Two ways to load it, each for ``--duration`` seconds, then stop by itself:

- closed loop, ``--concurrency C``: C clients, each sends its next request when the previous one is answered;
- open loop, ``--rate R``: Poisson arrivals at R requests/s (exponential gaps from a seeded generator, so a
  run is reproducible); a request's latency counts from its scheduled arrival, so client-side waiting is
  included.

Each request is one ``generate`` call for one image (labels cycled, seeds distinct). Reported per run
(:func:`summarize`): images/s, latency p50/p90/p99, time to admission p50/p99 (when the server reports it per
response), the mean denoiser batch in rows per call (the server's counters before and after: the ``info``
model's ``stats``, else Triton's ``nv_inference_count`` / ``nv_inference_exec_count`` of the ``denoise``
model), refusals and errors, SLO attainment for ``--slo``. The baseline is the same settings with requests
sent one after another. Percentiles: linear interpolation between the closest ranks (numpy's default,
:func:`percentile`).

HTTP through :mod:`ditdeploy.serving.client` (standard library + numpy): no PyTriton, no numpy<2.
"""

from __future__ import annotations

import math
import random
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ditdeploy.errors import DitDeployError


# ------------------------------------------------------------------------------------------ statistics
def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default); None if
    empty."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Outcome:
    """One request: when it arrived (scheduled), was sent and answered (seconds from the run's start)."""

    index: int
    arrival: float
    sent: float
    done: float
    status: str = "ok"  # ok | refused (503) | error
    images: int = 1
    admission_s: float | None = None  # server-reported: arrival at the server -> first denoiser call
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.done - self.arrival


def summarize(outcomes: Sequence[Outcome], wall_s: float, slo_s: float | None = None,
              counted: dict[str, float] | None = None) -> dict[str, Any]:
    """The numbers of one run. ``wall_s``: from the run's start to its last answer; ``counted``: the denoiser
    ``rows``, ``calls`` (and ``busy_s``, seconds in calls) the server counted during the run. SLO attainment is over
    every request issued (a refused or failed request misses it)."""
    ok = [o for o in outcomes if o.status == "ok"]
    lat = [o.latency for o in ok]
    adm = [o.admission_s for o in ok if o.admission_s is not None]
    out: dict[str, Any] = {
        "requests": len(outcomes), "completed": len(ok),
        "refused": sum(o.status == "refused" for o in outcomes), "errors": sum(o.status == "error" for o in outcomes),
        "images": sum(o.images for o in ok), "wall_s": wall_s,
        "images_per_s": sum(o.images for o in ok) / wall_s if wall_s > 0 else None,
        "latency_s": {f"p{q}": percentile(lat, q) for q in (50, 90, 99)} | {"mean": sum(lat) / len(lat) if lat
                                                                            else None, "max": max(lat, default=None)},
        "admission_s": {f"p{q}": percentile(adm, q) for q in (50, 99)} | {"reported": len(adm)},
    }
    if slo_s is not None:
        met = sum(1 for o in ok if o.latency <= slo_s)
        out["slo"] = {"latency_s": slo_s, "met": met, "attainment": met / len(outcomes) if outcomes else None}
    if counted is not None:
        rows, calls = counted["rows"], counted["calls"]
        out["denoiser"] = {"rows": rows, "calls": calls, "mean_batch": rows / calls if calls else None}
        if counted.get("busy_s") is not None:
            out["denoiser"]["mean_call_s"] = counted["busy_s"] / calls if calls else None
    errs = sorted({o.error for o in outcomes if o.error})
    if errs:
        out["error_messages"] = errs[:5]
    return out


# ------------------------------------------------------------------------------------------ arrivals and drivers
def poisson_arrivals(rate: float, duration: float, seed: int) -> list[float]:
    """Arrival times in [0, duration) of a Poisson process of ``rate`` per second (seeded: reproducible)."""
    if not rate > 0 or not duration > 0:
        raise DitDeployError(f"--rate and --duration must be > 0, got {rate} and {duration}")
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append(t)


Send = Callable[[int], tuple[str, int, float | None, str | None]]  # index -> (status, images, admission_s, error)


def _record(send: Send, i: int, arrival: float, t0: float) -> Outcome:
    sent = time.perf_counter() - t0
    try:
        status, images, adm, err = send(i)
    except Exception as e:  # noqa: BLE001 - one failed request is a data point, not the end of the run
        status, images, adm, err = "error", 0, None, f"{type(e).__name__}: {e}"
    return Outcome(i, arrival, sent, time.perf_counter() - t0, status, images, adm, err)


def run_closed(send: Send, concurrency: int, duration: float, max_requests: int | None = None) -> tuple[list, float]:
    """``concurrency`` clients back to back; no request starts after ``duration`` s. Returns (outcomes, wall_s)."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    counter = iter(range(max_requests if max_requests is not None else 1 << 62))
    t0 = time.perf_counter()

    def client() -> None:
        while time.perf_counter() - t0 < duration:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            o = _record(send, i, time.perf_counter() - t0, t0)
            with lock:
                outcomes.append(o)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sorted(outcomes, key=lambda o: o.index), max((o.done for o in outcomes), default=0.0)


def run_open(send: Send, arrivals: Sequence[float]) -> tuple[list, float]:
    """One request per arrival time (seconds from the start), each on its own thread so a slow answer never delays
    the next arrival. Returns (outcomes, wall_s)."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def one(i: int, at: float) -> None:
        o = _record(send, i, at, t0)
        with lock:
            outcomes.append(o)

    threads = []
    for i, at in enumerate(arrivals):
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=one, args=(i, at), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return sorted(outcomes, key=lambda o: o.index), max((o.done for o in outcomes), default=0.0)


# ------------------------------------------------------------------------------------------ the server's counters
_METRICS = {"nv_inference_count": "rows", "nv_inference_exec_count": "calls",
            "nv_inference_compute_infer_duration_us": "busy_s"}
_METRIC = re.compile(r'^(' + "|".join(_METRICS) + r')\{model="([^"]+)"[^}]*\}\s+([0-9.eE+-]+)$')


def triton_counts(metrics_text: str, model: str = "denoise") -> dict[str, float] | None:
    """``rows``, ``calls``, ``busy_s`` of ``model`` from Triton's Prometheus text, summed over versions:
    ``nv_inference_count`` counts a batched request once per batch element (rows), ``nv_inference_exec_count``
    counts executions (calls), ``nv_inference_compute_infer_duration_us`` the time in them."""
    got: dict[str, float] = {}
    for line in metrics_text.splitlines():
        m = _METRIC.match(line.strip())
        if m and m.group(2) == model:
            key = _METRICS[m.group(1)]
            got[key] = got.get(key, 0.0) + float(m.group(3)) / (1e6 if key == "busy_s" else 1)
    return got if {"rows", "calls"} <= set(got) else None


@dataclass
class Counters:
    """Reads the server's denoiser (rows, calls): the ``info`` model's stats, else Triton's metrics endpoint."""

    url: str
    metrics_url: str | None = None
    source: str | None = None

    def read(self) -> dict[str, float] | None:
        from ditdeploy.serving.client import ServerError, server_info

        if self.source in (None, "info"):
            try:
                d = (server_info(self.url, timeout=30).raw.get("stats") or {}).get("denoiser") or {}
                if "rows" in d and "calls" in d:
                    self.source = "info"
                    return {k: float(d[k]) for k in ("rows", "calls", "busy_s") if d.get(k) is not None}
            except (ServerError, KeyError, ValueError, TypeError):
                pass
        if self.metrics_url and self.source in (None, "metrics"):
            try:
                with urllib.request.urlopen(self.metrics_url, timeout=30) as r:
                    got = triton_counts(r.read().decode("utf-8", "replace"))
            except OSError:
                got = None
            if got is not None:
                self.source = "metrics"
                return got
        return None


def delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """What the server counted between two reads."""
    if before is None or after is None:
        return None
    return {k: after[k] - before[k] for k in after if k in before}


# ------------------------------------------------------------------------------------------ the load test
@dataclass
class LoadSpec:
    """One ``bench --server`` invocation."""

    url: str
    rates: list[float] = field(default_factory=list)  # requests/s (open loop), one run each
    concurrencies: list[int] = field(default_factory=list)  # clients (closed loop), one run each
    duration: float = 30.0
    seed: int = 0
    steps: int = 50
    sampler: str = "ddim"
    cfg_scale: float = 4.0
    labels: list[int | str] = field(default_factory=lambda: list(range(10)))  # class ids or names
    slo: float | None = None
    baseline: int = 8  # requests sent one after another (0: none)
    metrics_url: str | None = None
    timeout: float = 600.0


def default_metrics_url(url: str) -> str:
    """Triton's metrics endpoint beside an HTTP URL: the same host, port + 2 (8000 -> 8002, as serve and
    tritonserver default)."""
    from urllib.parse import urlsplit

    u = urlsplit(url if "://" in url else f"http://{url}")
    port = (u.port or 80) + 2
    return f"{u.scheme}://{u.hostname}:{port}/metrics"


def generate_outputs_of(url: str) -> list[str]:
    """The output names of the server's ``generate`` model (``GET /v2/models/generate/config``), [] if unknown."""
    import json

    from ditdeploy.serving.client import base_url

    try:
        with urllib.request.urlopen(f"{base_url(url)}/v2/models/generate/config", timeout=30) as r:
            return [o["name"] for o in json.loads(r.read()).get("output", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def http_sender(spec: LoadSpec) -> Send:
    """The request for index i: one image of label ``labels[i % n]``, seed ``spec.seed + i``, through
    ``ditdeploy.serving.client`` (no 503 retry: a refusal is counted). The server's ``admission_s`` output is read
    when its generate model has one (``ditdeploy serve``)."""
    from ditdeploy.run.generation import SampleRequest
    from ditdeploy.serving.client import ServerError, generate_outputs
    from ditdeploy.serving.protocol import GenerateRequest

    wanted = ("images", "labels") + (("admission_s",) if "admission_s" in generate_outputs_of(spec.url) else ())

    def send(i: int) -> tuple[str, int, float | None, str | None]:
        req = GenerateRequest(labels=[spec.labels[i % len(spec.labels)]], sampling=SampleRequest(
            out=None, steps=spec.steps, sampler=spec.sampler, cfg_scale=spec.cfg_scale, seed=spec.seed + i))
        try:
            out = generate_outputs(spec.url, req, timeout=spec.timeout, busy_retry_s=0.0, outputs=wanted)
        except ServerError as e:
            return ("refused" if e.status == 503 else "error"), 0, None, str(e)
        adm = out.get("admission_s")
        return "ok", int(out["images"].shape[0]), (float(adm.reshape(-1)[0]) if adm is not None else None), None

    return send


def check_ready(url: str, timeout: float = 10.0) -> None:
    """One-line DitDeployError unless ``url`` answers Triton's readiness endpoint (``/v2/health/ready``) with 200."""
    from ditdeploy.serving.client import base_url

    url = base_url(url)
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=timeout) as r:
            if r.status == 200:
                return
            why = f"HTTP {r.status}"
    except OSError as e:
        why = str(getattr(e, "reason", None) or e)
    raise DitDeployError(f"server {url} is not ready ({why}): start it (ditdeploy serve) or check --server")


def run_load(spec: LoadSpec, send: Send | None = None, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every run of ``spec`` (baseline first), each summarized; the server's counters around each run."""
    if send is None:
        check_ready(spec.url)
    send = send or http_sender(spec)
    counters = Counters(spec.url, spec.metrics_url or default_metrics_url(spec.url))
    say = say or (lambda s: None)
    runs: list[dict[str, Any]] = []

    def measured(mode: str, load: float, go: Callable[[], tuple[list, float]]) -> None:
        before = counters.read()
        outcomes, wall = go()
        s = summarize(outcomes, wall, spec.slo, delta(before, counters.read()))
        runs.append({"mode": mode, "load": load, **s})
        lat = s["latency_s"]
        say(f"{mode} {load:g}: {s['completed']}/{s['requests']} ok, {s['images_per_s'] or 0:.2f} img/s, latency "
            f"p50 {_fmt(lat['p50'])} p99 {_fmt(lat['p99'])}"
            + (f", mean batch {s['denoiser']['mean_batch']:.2f} rows" if s.get("denoiser", {}).get("mean_batch")
               else ""))

    if spec.baseline:
        measured("sequential", 1, lambda: run_closed(send, 1, math.inf, spec.baseline))
    for c in spec.concurrencies:
        measured("concurrency", c, lambda c=c: run_closed(send, c, spec.duration))
    for r in spec.rates:
        measured("rate", r, lambda r=r: run_open(send, poisson_arrivals(r, spec.duration, spec.seed)))
    base = runs[0] if spec.baseline else None
    for run in runs[1 if base else 0:]:
        if base and base["images_per_s"] and run["images_per_s"]:
            run["throughput_vs_sequential"] = run["images_per_s"] / base["images_per_s"]
        if base and base["latency_s"]["p50"] and run["latency_s"]["p99"]:
            run["p99_vs_idle_latency"] = run["latency_s"]["p99"] / base["latency_s"]["p50"]
    settings = {k: v for k, v in asdict(spec).items() if k not in ("rates", "concurrencies")}
    return {"kind": "serving-load-test", "settings": settings, "counter_source": counters.source, "runs": runs}


def _fmt(s: float | None) -> str:
    return "-" if s is None else f"{s:.3f}s"


def format_table(result: dict[str, Any]) -> str:
    """One line per run."""
    head = f"{'run':<16}{'ok/sent':>9}{'img/s':>9}{'p50 s':>9}{'p90 s':>9}{'p99 s':>9}{'adm p99':>9}{'batch':>7}"
    lines = [head]
    for r in result["runs"]:
        lat, adm = r["latency_s"], r["admission_s"]
        batch = (r.get("denoiser") or {}).get("mean_batch")
        cells = [f"{r['completed']}/{r['requests']}", _num(r["images_per_s"]), _num(lat["p50"]), _num(lat["p90"]),
                 _num(lat["p99"]), _num(adm["p99"]), _num(batch)]
        lines.append(f"{r['mode'] + ' ' + format(r['load'], 'g'):<16}" + "".join(f"{c:>9}" for c in cells[:6])
                     + f"{cells[6]:>7}")
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def write_plot(result: dict[str, Any], path: Any) -> None:
    """Latency (p50, p99) against achieved throughput, one point per run; the sequential baseline marked."""
    from ditdeploy.errors import require

    require("matplotlib", "bench", "the --plot option").use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r["images_per_s"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, marker in (("concurrency", "o"), ("rate", "s"), ("sequential", "*")):
        rs = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["images_per_s"])
        if not rs:
            continue
        x = [r["images_per_s"] for r in rs]
        ax.plot(x, [r["latency_s"]["p50"] for r in rs], marker=marker, label=f"{mode} p50")
        ax.plot(x, [r["latency_s"]["p99"] for r in rs], marker=marker, linestyle="--", label=f"{mode} p99")
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency (s)")
    ax.set_title("generate: latency vs load")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    from ditdeploy.artifact.files import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
