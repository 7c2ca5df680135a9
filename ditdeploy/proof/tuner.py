"""The recipe tuner behind ``ditdeploy tune``: time candidate recipes, price their quality, pick the fastest.

On this machine, candidate recipes (artifact x backend x precision hint x less-work setting x threads) are
timed in one interleaved run, each one's quality price is measured, and the fastest within a stated quality
budget is picked.

- **Speed**: ``rounds`` rounds; in each, every candidate samples the same ``images`` images once through
  :func:`ditdeploy.run.generation.generate` (exactly what ``ditdeploy sample`` runs), in an order rotated
  every round so slow load changes hit every candidate alike. The time is the run's sampling + decode seconds
  (total minus load and write); the median over rounds is reported with the machine's load average.
- **Quality price**, against the reference (the first fp32 artifact, ONNX Runtime, full work, same seeds):
  per-call cosine of the candidate's denoiser on fixed probe inputs (``ditdeploy.proof.parity.probe_inputs``);
  end-to-end latent drift (rel-L2, cosine) of its first timed run's final latents; and, for the digits model,
  the FID delta (``ditdeploy.fid``, offline digits extractor) of ``fid_samples`` images from the same seeds.
- **Budget** (default): per-call cosine >= the int8 limit of ``ditdeploy.proof.parity.THRESHOLDS`` (0.99); FID
  delta <= 0.1 where FID is measured, else latent drift rel-L2 <= 0.2 (the guidance interval changes samples
  by design: docs/less-work.md). The pick is the fastest candidate within it (the reference always is).
- **Resumable**: every measurement is written to a state file (JSON, atomically) as it completes; a rerun with
  the same request reuses every measured row and measures only what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Candidate", "TuneRequest", "candidates", "format_table", "tune"]

STATE_VERSION = 1
LESS_WORK = ("full", "interval", "cache", "interval+cache")
DEFAULT_MAX_FID_DELTA = 0.1
DEFAULT_MAX_DRIFT = 0.2


@dataclass
class TuneRequest:
    """What to tune (see module docstring). ``engines``: artifacts of ONE model (fp32, INT8, two-graph pairs)."""

    engines: list[Path]
    backends: list[str] | None = None  # None: ONNX Runtime and OpenVINO where installed
    hints: list[str] | None = None  # OpenVINO precision hints; None: f32, plus bf16 where the CPU has bf16
    less_work: list[str] | None = None  # of LESS_WORK; None: all that apply
    threads: list[int] | None = None  # None: [physical cores]
    vae: Path | None = None  # VAE decoder of a latent model (None: the artifact manifest's)
    cfg_interval: list[int] = field(default_factory=lambda: [150, 750])
    cache_interval: int = 2
    sampler: str = "ddim"
    steps: int = 50
    cfg_scale: float | None = None
    seed: int = 0
    images: int = 8
    rounds: int = 3
    fid: bool | None = None  # None: on for the digits model
    fid_samples: int = 1000
    min_call_cosine: float | None = None  # None: THRESHOLDS int8 call cosine
    max_fid_delta: float | None = DEFAULT_MAX_FID_DELTA
    max_drift: float | None = None  # None: DEFAULT_MAX_DRIFT when FID is not measured
    state: Path | None = None
    progress: bool = False


@dataclass(frozen=True)
class Candidate:
    """One recipe to time."""

    engine: str
    backend: str
    hint: str | None
    less_work: str
    threads: int

    @property
    def key(self) -> str:
        be = self.backend + (f":{self.hint}" if self.hint else "")
        return f"{Path(self.engine).name} {be} {self.less_work} t{self.threads}"


def _physical_cores() -> int:
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:  # pragma: no cover - psutil is a core dependency
        return os.cpu_count() or 1


def _has_bf16() -> bool:
    from ditdeploy.system.cpu_isa import detect

    return bool({"avx512_bf16", "amx_bf16"} & detect().flags)


def _installed(backend: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(backend) is not None


def candidates(req: TuneRequest, pairs: dict[str, bool]) -> list[Candidate]:
    """Every candidate of ``req``; ``pairs`` says which engines are two-graph exports (feature reuse)."""
    from ditdeploy.runtimes.registry import get_backend

    backends = req.backends or [b for b in ("onnxruntime", "openvino") if _installed(b)]
    hints = req.hints or (["f32", "bf16"] if _has_bf16() else ["f32"])
    threads = req.threads or [_physical_cores()]
    out = []
    for e in req.engines:
        for b in backends:
            if Path(e).suffix.lower() not in get_backend(b).reads:
                continue
            for h in (hints if b == "openvino" else [None]):
                for lw in (req.less_work or LESS_WORK):
                    if "cache" in lw and not pairs[str(e)]:
                        continue
                    out.extend(Candidate(str(e), b, h, lw, n) for n in threads)
    return out


def _sample_request(req: TuneRequest, c: Candidate, labels: list[int], npz: Path | None = None):
    """What ``ditdeploy sample`` would run for candidate ``c`` on ``labels`` (same seeds for every candidate)."""
    from ditdeploy.run.generation import SampleRequest

    opts: dict[str, Any] = {"threads": c.threads}
    if c.hint:
        opts["precision_hint"] = c.hint
    return SampleRequest(engine=Path(c.engine), backend=c.backend, options=opts, labels=list(labels), vae=req.vae,
                         sampler=req.sampler, steps=req.steps, cfg_scale=req.cfg_scale, seed=req.seed,
                         out=None, npz=npz, batch_size=None, progress=False,
                         cfg_interval=list(req.cfg_interval) if "interval" in c.less_work else None,
                         cache_interval=req.cache_interval if "cache" in c.less_work else None)


# ------------------------------------------------------------------------------------------------ state
class _State:
    """The resumable measurements: ``rows[key]`` = {times, loads, call_cosine, drift, fid}, plus the reference's
    latents (an .npy beside the state file) and FID."""

    def __init__(self, path: Path | None, fingerprint: str):
        self.path = path
        self.data: dict[str, Any] = {"version": STATE_VERSION, "fingerprint": fingerprint, "rows": {},
                                     "reference": {}}
        self.resumed = 0
        if path is not None and path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError):
                old = None
            if isinstance(old, dict) and old.get("fingerprint") == fingerprint and old.get("version") == STATE_VERSION:
                self.data = old
                self.resumed = sum(len(r.get("times", [])) for r in old.get("rows", {}).values())

    def row(self, key: str) -> dict[str, Any]:
        return self.data["rows"].setdefault(key, {"times": [], "loads": []})

    def save(self) -> None:
        if self.path is not None:
            from ditdeploy.artifact.files import write_json_atomic

            write_json_atomic(self.path, self.data)

    def latents_path(self) -> Path | None:
        return None if self.path is None else self.path.with_name(self.path.name + ".ref-latents.npy")


def _fingerprint(req: TuneRequest, cands: list[Candidate]) -> str:
    from ditdeploy.artifact.files import sha256_file

    what = {"engines": [sha256_file(e) for e in req.engines], "sampler": req.sampler, "steps": req.steps,
            "cfg_scale": req.cfg_scale, "seed": req.seed, "images": req.images, "cfg_interval": req.cfg_interval,
            "cache_interval": req.cache_interval, "fid_samples": req.fid_samples}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ measurements
def _timed_run(req: TuneRequest, c: Candidate, num_classes: int) -> tuple[float, np.ndarray, dict[str, Any]]:
    """One sampling run of ``req.images`` images: (sampling + decode seconds, final latents, work)."""
    from ditdeploy.run.generation import generate

    res = generate(_sample_request(req, c, [i % num_classes for i in range(req.images)]))
    t = res.timings
    return t.total_s - t.load_s - t.write_s, np.asarray(res.latents), dict(res.work)


def _call_cosine(c: Candidate, ref_out: list[np.ndarray], feeds: list[dict[str, np.ndarray]]) -> float:
    """Worst per-call cosine of the candidate's denoiser vs the reference outputs on ``feeds`` (one per feed;
    ``parity.compare_runs``, recorded: the budget judges it)."""
    from ditdeploy.proof.parity import compare_runs
    from ditdeploy.runtimes import load

    den = load(c.engine, backend=c.backend, threads=c.threads,
               **({"precision_hint": c.hint} if c.hint else {}))
    res = compare_runs(ref_out, lambda f: den(f["x"], f["t"], f["y"]), feeds, thresholds=None,
                       what=f"{c.engine} on {c.backend}", against="the fp32 reference", keep_outputs=True)
    return float(min(r.cosine for r in res.rows()))


def _fid(req: TuneRequest, c: Candidate, num_classes: int) -> float:
    """FID vs the real digits of ``fid_samples`` images of ``c`` (classes in turn; same seeds for every candidate)."""
    import tempfile

    from ditdeploy.fid.evaluate import DIGITS_REF, FidRequest, evaluate
    from ditdeploy.run.generation import generate

    with tempfile.TemporaryDirectory(prefix=".ditdeploy-tune-") as tmp:
        npz = Path(tmp) / "s.npz"
        generate(_sample_request(req, c, [i % num_classes for i in range(req.fid_samples)], npz))
        return float(evaluate(FidRequest(samples=npz, ref=DIGITS_REF, progress=False,
                                         precision_recall=False))["metrics"]["fid"])


# ------------------------------------------------------------------------------------------------ main entry
def tune(req: TuneRequest, on_run: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every candidate (resuming from ``req.state``), pick the fastest within budget; returns the result
    (``rows``, ``pick``, ``budget``, ``machine``, ``reference``). ``on_run(key)`` is called after each timed run."""
    from ditdeploy.artifact.manifest import Manifest
    from ditdeploy.bench.machine import machine_info
    from ditdeploy.errors import DitDeployError
    from ditdeploy.proof import distances
    from ditdeploy.proof.parity import probe_inputs, thresholds_for

    _validate(req)
    mans = {str(e): Manifest.load(e, verify=True) for e in req.engines}
    ref_engine = next((e for e in req.engines if mans[str(e)].precision == "fp32"), None)
    if ref_engine is None:
        raise DitDeployError("tune needs an fp32 artifact among --engine (the reference every recipe is priced "
                             "against)")
    cfgs = {(m.config.in_channels, m.config.input_size, m.config.num_classes) for m in mans.values()}
    if len(cfgs) != 1:
        raise DitDeployError("the --engine artifacts are not of one model (their configs differ)")
    pairs = {k: isinstance(m.get("cache_graphs"), dict) for k, m in mans.items()}
    cands = candidates(req, pairs)
    ref = Candidate(str(ref_engine), "onnxruntime", None, "full", (req.threads or [_physical_cores()])[0])
    if ref not in cands:
        cands.insert(0, ref)
    else:
        cands.insert(0, cands.pop(cands.index(ref)))
    cfg = mans[str(ref_engine)].config
    fid_on = req.fid if req.fid is not None else str(cfg.variant).lower() == "digits"
    budget = _budget(req, fid_on, thresholds_for("int8").call_cosine)
    state = _State(req.state, _fingerprint(req, cands))
    total = len(cands) * (req.rounds + 1 + (1 if fid_on else 0))
    bar = _bar(req.progress, total)
    load_start = [round(x, 2) for x in os.getloadavg()]
    try:
        feeds = probe_inputs(cfg, (2, 2, 2, 2), seed=req.seed)
        ref_out = None
        by_denoiser: dict[tuple, float] = {}  # less-work variants share their denoiser: loaded and priced once
        for c in cands:  # per-call cosine
            row = state.row(c.key)
            den_key = (c.engine, c.backend, c.hint)
            if "call_cosine" not in row:
                if den_key not in by_denoiser:
                    if ref_out is None:
                        from ditdeploy.runtimes import load

                        den = load(ref.engine, backend="onnxruntime", threads=ref.threads)
                        ref_out = [np.asarray(den(f["x"], f["t"], f["y"])) for f in feeds]
                        del den
                    by_denoiser[den_key] = _call_cosine(c, ref_out, feeds)
                row["call_cosine"] = by_denoiser[den_key]
                state.save()
            by_denoiser.setdefault(den_key, row["call_cosine"])
            bar.update(1)
        lat_path = state.latents_path()
        ref_lat = np.load(lat_path) if lat_path is not None and lat_path.exists() else None
        for r in range(req.rounds):  # interleaved timing, order rotated every round (the reference first in round 0)
            order = cands[r % len(cands):] + cands[:r % len(cands)]
            for c in order:
                row = state.row(c.key)
                if len(row["times"]) > r:
                    bar.update(1)
                    continue
                secs, lat, work = _timed_run(req, c, cfg.num_classes)
                row["times"].append(secs)
                row["loads"].append(round(os.getloadavg()[0], 2))
                row["work"] = work
                if c == ref and ref_lat is None:
                    ref_lat = lat
                    if lat_path is not None:
                        np.save(lat_path, lat)
                if "drift" not in row and ref_lat is not None:
                    row["drift"] = {"rel_l2": distances.rel_l2(lat, ref_lat), "cosine": distances.cosine(lat, ref_lat)}
                state.save()
                bar.update(1)
                if on_run is not None:
                    on_run(c.key)
        if fid_on:
            for c in cands:
                row = state.row(c.key)
                if "fid" not in row:
                    row["fid"] = _fid(req, c, cfg.num_classes)
                    state.save()
                bar.update(1)
    finally:
        bar.close()
    rows = _rows(cands, state, ref, budget)
    pick = min((r for r in rows if r["within_budget"]), key=lambda r: r["median_s"])
    pick["picked"] = True
    info = machine_info()
    info["load_avg_start"] = load_start
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info, "budget": budget,
            "workload": {"sampler": req.sampler, "steps": req.steps, "cfg_scale": req.cfg_scale, "seed": req.seed,
                         "images": req.images, "rounds": req.rounds, "fid_samples": req.fid_samples if fid_on else None,
                         "cfg_interval": list(req.cfg_interval), "cache_interval": req.cache_interval},
            "reference": ref.key, "rows": rows, "pick": pick, "resumed_runs": state.resumed}


def _validate(req: TuneRequest) -> None:
    from ditdeploy.errors import DitDeployError

    checks = [
        (len(req.engines) >= 1, "pass at least one --engine"),
        (req.rounds >= 1, f"--rounds must be >= 1, got {req.rounds}"),
        (req.images >= 1, f"--images must be >= 1, got {req.images}"),
        (req.fid_samples >= 10, f"--fid-samples must be >= 10, got {req.fid_samples}"),
        (all(lw in LESS_WORK for lw in (req.less_work or [])), f"--less-work takes {', '.join(LESS_WORK)}"),
        (all(n >= 1 for n in (req.threads or [])), "--threads values must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise DitDeployError(msg)
    for e in req.engines:
        if not Path(e).is_file():
            raise DitDeployError(f"no such file: {e}")


def _budget(req: TuneRequest, fid_on: bool, int8_cosine: float) -> dict[str, Any]:
    drift = req.max_drift if req.max_drift is not None else (None if fid_on else DEFAULT_MAX_DRIFT)
    return {"min_call_cosine": req.min_call_cosine if req.min_call_cosine is not None else int8_cosine,
            "max_fid_delta": req.max_fid_delta if fid_on else None, "max_drift_rel_l2": drift}


def _rows(cands: list[Candidate], state: _State, ref: Candidate, budget: dict[str, Any]) -> list[dict[str, Any]]:
    ref_row = state.row(ref.key)
    ref_s = float(np.median(ref_row["times"]))
    rows = []
    for c in cands:
        r = state.row(c.key)
        med = float(np.median(r["times"]))
        fid_delta = (r["fid"] - ref_row["fid"]) if "fid" in r and "fid" in ref_row else None
        drift = r.get("drift", {}).get("rel_l2")
        ok = r["call_cosine"] >= budget["min_call_cosine"]
        if budget["max_fid_delta"] is not None:
            ok = ok and fid_delta is not None and fid_delta <= budget["max_fid_delta"]
        if budget["max_drift_rel_l2"] is not None:
            ok = ok and drift is not None and drift <= budget["max_drift_rel_l2"]
        rows.append({"key": c.key, **dataclasses.asdict(c), "median_s": med, "times_s": list(r["times"]),
                     "load_avg_1m": list(r["loads"]), "speedup_vs_reference": ref_s / med,
                     "call_cosine_min": r["call_cosine"], "drift": r.get("drift"), "fid": r.get("fid"),
                     "fid_delta": fid_delta, "work": r.get("work"), "within_budget": bool(ok or c == ref),
                     "picked": False})
    return rows


def _bar(on: bool, total: int) -> Any:
    if on:
        from tqdm import tqdm

        return tqdm(total=total, desc="tune", unit="run", dynamic_ncols=True)

    class _Null:
        def update(self, n: int) -> None:
            pass

        def close(self) -> None:
            pass

    return _Null()


def format_table(res: dict[str, Any]) -> str:
    """The terminal table: one line per candidate, fastest first, the pick starred."""
    m, b = res["machine"], res["budget"]
    lines = [f"tune on {m.get('cpu')} ({m.get('usable_cpus')} cpus, ISA {','.join(m.get('flags', []))}; load "
             f"{m.get('load_avg_start')} -> {m.get('load_avg_1_5_15')}); budget: call cosine >= "
             f"{b['min_call_cosine']}" + (f", FID delta <= {b['max_fid_delta']}" if b["max_fid_delta"] is not None
                                          else "") +
             (f", drift rel-L2 <= {b['max_drift_rel_l2']}" if b["max_drift_rel_l2"] is not None else ""),
             f"  {'candidate':<52} {'median s':>9} {'x ref':>6} {'cosine':>8} {'drift':>7} {'FID d':>7}  ok"]
    for r in sorted(res["rows"], key=lambda r: r["median_s"]):
        drift = r["drift"]["rel_l2"] if r.get("drift") else None
        fd = r.get("fid_delta")
        lines.append(f"{'*' if r['picked'] else ' '} {r['key']:<52} {r['median_s']:>9.3f} "
                     f"{r['speedup_vs_reference']:>6.2f} {r['call_cosine_min']:>8.5f} "
                     f"{'-' if drift is None else format(drift, '.4f'):>7} "
                     f"{'-' if fd is None else format(fd, '+.3f'):>7}  {'yes' if r['within_budget'] else 'no'}")
    return "\n".join(lines)


def write_plot(res: dict[str, Any], path: str | os.PathLike) -> None:
    """Speed (x reference) against quality price (FID delta, else latent drift), budget line, pick marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ditdeploy.artifact.files import atomic_path

    use_fid = res["budget"]["max_fid_delta"] is not None
    fig, (ax, side) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    legend = []
    for i, r in enumerate(res["rows"], 1):
        q = r["fid_delta"] if use_fid else (r["drift"] or {}).get("rel_l2")
        if q is None:
            continue
        ax.scatter(r["speedup_vs_reference"], q, marker="*" if r["picked"] else "o",
                   s=160 if r["picked"] else 30, c="C3" if r["picked"] else ("C0" if r["within_budget"] else "C7"))
        ax.annotate(str(i), (r["speedup_vs_reference"], q), fontsize=7, xytext=(3, 3), textcoords="offset points")
        legend.append(f"{i:>2}{'*' if r['picked'] else ' '} {r['speedup_vs_reference']:5.2f}x  {r['key']}")
    lim = res["budget"]["max_fid_delta"] if use_fid else res["budget"]["max_drift_rel_l2"]
    if lim is not None:
        ax.axhline(lim, ls="--", c="C3", lw=1)
    ax.set_xlabel("speed-up vs the reference (fp32, ONNX Runtime, full work), same images, interleaved")
    ax.set_ylabel("FID delta vs the reference" if use_fid else "latent drift rel-L2 vs the reference")
    m = res.get("machine") or {}
    isa = ",".join(m.get("flags") or []) or "?"
    masked = " (CPUID masked: experiments/cpu_mask.py)" if m.get("cpuid_mask") else ""
    ax.set_title(f"ditdeploy tune: {m.get('cpu')}\nISA {isa}{masked}", fontsize=8)
    side.axis("off")
    side.text(0, 1, "\n".join(legend), va="top", ha="left", family="monospace", fontsize=6.5,
              transform=side.transAxes)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def recipe_of(res: dict[str, Any], recipe_path: str | os.PathLike) -> Any:
    """The :class:`ditdeploy.run.recipes.Recipe` of the pick (engine path relative to the recipe file when possible)."""
    from ditdeploy.artifact.files import sha256_file
    from ditdeploy.run.recipes import Recipe

    p, w = res["pick"], res["workload"]
    engine = Path(p["engine"]).resolve()
    try:
        rel = str(engine.relative_to(Path(recipe_path).resolve().parent))
    except ValueError:
        rel = str(engine)
    return Recipe(engine=rel, engine_sha256=sha256_file(engine), backend=p["backend"],
                  options={"threads": p["threads"], **({"precision_hint": p["hint"]} if p["hint"] else {})},
                  cfg_interval=w["cfg_interval"] if "interval" in p["less_work"] else None,
                  cache_interval=w["cache_interval"] if "cache" in p["less_work"] else None,
                  tuned_for={k: w[k] for k in ("sampler", "steps", "cfg_scale", "seed", "images")},
                  measured={k: p[k] for k in ("median_s", "speedup_vs_reference", "call_cosine_min", "drift",
                                              "fid", "fid_delta", "work")},
                  budget=res["budget"],
                  machine={k: res["machine"].get(k) for k in ("cpu", "flags", "usable_cpus", "load_avg_start",
                                                              "load_avg_1_5_15")},
                  name=p["key"])
