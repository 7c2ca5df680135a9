"""Compiled GPU engines of one DiT (XL/2 256 by default) in one timed run, as ``experiments/gpu_run.sh engines`` does.

    python3 -m experiments.gpu_engines --out DIR                       # on a CUDA machine -> DIR/gpu_engines.json
    python3 -m experiments.gpu_engines --out DIR --plan first          # the short first run (FIRST_PLAN, < 5 min)
    python3 -m experiments.gpu_engines --out DIR --device cpu --tiny   # the code path on a CPU (digits model)
    python3 -m experiments.gpu_engines --out DIR --dry-run             # the plan only: what would run
    python3 -m experiments.gpu_engines --summarize DIR/gpu_engines.json  # markdown tables of a result

Contenders per batch (2 / 8 / 32), each timed on device tensors with CUDA events (median after warm-up):

* ``eager_fp16`` / ``eager_bf16``: ``torch.autocast`` over fp32 weights;
* ``aoti_<p>`` / ``aoti_<p>_graph`` for p in bf16, fp16, fp8: an AOTInductor package (``ditdeploy.export.aoti``'s
  ``check_target`` + ``precision_module`` + ``compile_package``, dynamic batch) loaded as ``ditdeploy sample``
  loads it (``runtimes.aoti.load_package``, single-threaded: capturable), plain at every batch, then replayed as a
  CUDA graph per batch (each capture inside its own row's guard); fp8 goes through ``ditdeploy.export.fp8``
  (activation scales from the fixed inputs: random weights have no data). A module missing from the checkout, a
  torch API missing (``runtimes.torch_env``), no CUDA toolkit (every AOTI row skipped with that one line), or a
  target ``check_target`` refuses (fp8 below compute capability 8.9), is recorded as not measured, nothing faked;
* ``compile_bf16``: ``torch.compile(mode="max-autotune")`` of the bf16-autocast model (one compile per batch);
* ``tensorrt_fp16``: only when ``import tensorrt`` works (fp16 ONNX -> engine -> ``TensorRTDenoiser``, per-call
  time includes the host copies); otherwise the row says TensorRT is not importable.

Every row: per-call parity against fp32 eager (TF32 off) on the same inputs (rel-L2, cosine, max-abs), TFLOP/s
(2 x ``DiTConfig.macs()`` x batch / time) and its share of the bf16 matmul peak measured first on the same machine.
End to end: DDIM-50, cfg 4, 8 images (denoiser batch 16) with fp32 eager and with AOTI bf16 (else eager bf16) as a
CUDA graph, both through ``runtimes.cuda_staging.StagedCall`` (numpy in/out, as ``ditdeploy sample`` runs them).
Sections run in order of importance under ``--budget-s``; a section that would not fit is recorded as skipped, and
the JSON is rewritten after every measurement, so a timeout keeps what was measured. Exit status 1 when a section or
a row recorded an error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from experiments.gpu_torch import (
    Recorder,
    _empty_cache,
    _stats,
    fixed_inputs,
    metrics,
    random_copy,
    set_tf32,
    time_ms,
)

CFG_SCALE = 4.0
AOTI_PRECISIONS = ("bf16", "fp8", "fp16")  # order of importance (the budget may cut the last)
# seconds a section needs at least (compile times on a 16-core host; the check skips what cannot finish)
NEEDS_S = {"aoti": 150, "e2e": 40, "compile": 200, "tensorrt": 240}


class Budget:
    """Wall-clock budget of the whole run."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


# --------------------------------------------------------------------------------------------- measuring helpers


def bf16_matmul_peak(device: Any, n: int = 8192, iters: int = 20) -> dict[str, Any]:
    """Best bf16 GEMM TFLOP/s over a few square sizes on ``device`` (the reference for % of peak)."""
    import torch

    sizes = [n, n // 2] if device.type == "cuda" else [512]
    probes = {}
    for s in sizes:
        a = torch.randn(s, s, device=device, dtype=torch.bfloat16)
        b = torch.randn(s, s, device=device, dtype=torch.bfloat16)
        ms = time_ms(lambda a=a, b=b: a @ b, device, 3, iters if device.type == "cuda" else 3)
        probes[str(s)] = round(2 * s**3 / (min(ms) / 1e3) / 1e12, 4)
        del a, b
    best = max(probes, key=probes.get)
    return {"tflops": probes[best], "n": int(best), "probes_tflops": probes, "timer": "min over calls"}


def cuda_graphed(fn: Callable[..., Any], args: tuple[Any, ...]) -> Callable[..., Any]:
    """``fn`` captured once as a CUDA graph on static copies of ``args``; the returned callable copies new
    inputs into them and replays (the output tensor is reused between calls)."""
    import torch

    static = tuple(a.clone() for a in args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture (allocator, lazy init)
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)

    def replay(*new: Any) -> Any:
        for s, a in zip(static, new, strict=True):
            s.copy_(a)
        graph.replay()
        return out

    replay.graph = graph  # keep it alive with the callable
    return replay


def _tensor(out: Any) -> Any:
    return out[0] if isinstance(out, (list, tuple)) else out


def _first(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` returning a single tensor (an AOTI package may return a list)."""
    return lambda *a: _tensor(fn(*a))


def device_inputs(cfg: Any, batch: int, device: Any, seed: int) -> tuple[Any, ...]:
    """Fixed inputs (t spread over 0..999, null class last) as device tensors."""
    import torch

    f = fixed_inputs(cfg, batch, seed)
    return tuple(torch.from_numpy(f[k]).to(device) for k in ("x", "t", "y"))


class Rows:
    """One result row per contender x batch: timing, TFLOP/s, % of the bf16 peak, parity vs fp32 eager."""

    def __init__(self, rec: Recorder, cfg: Any, device: Any, peak_tflops: float | None, refs: dict[int, np.ndarray],
                 warmup: int, iters: int):
        self.rec, self.cfg, self.device, self.peak = rec, cfg, device, peak_tflops
        self.refs, self.warmup, self.iters = refs, warmup, iters

    def measure(self, name: str, batch: int, fn: Callable[..., Any] | None, args: tuple[Any, ...], *,
                build: Callable[[], Callable[..., Any]] | None = None, **extra: Any) -> None:
        """Time ``fn`` (or the callable ``build()`` returns: built inside the row's guard, so a failed CUDA-graph
        capture is this row's error and the other rows still run) on ``args``."""
        import torch

        key = f"{name}/b{batch}"
        try:
            if build is not None:
                fn = build()
            with torch.inference_mode():
                out = _tensor(fn(*args)).detach().to("cpu", torch.float64).numpy()
                ms = time_ms(lambda: fn(*args), self.device, self.warmup, self.iters)
            row = {"contender": name, "batch": batch, **_stats(ms, batch), **extra}
            tflops = 2 * self.cfg.macs() * batch / (row["median_ms"] / 1e3) / 1e12
            row["tflops"] = round(tflops, 6)
            row["pct_of_bf16_peak"] = round(100 * tflops / self.peak, 2) if self.peak else None
            row["parity_vs_fp32_eager"] = metrics(out, self.refs[batch])
        except Exception as e:  # recorded: the other rows still run
            row = {"contender": name, "batch": batch, "error": f"{type(e).__name__}: {e}"[:800]}
            _empty_cache()
        self.rec.put("rows", key, row)

    def note(self, name: str, text: str) -> None:
        self.rec.put("notes", name, text)


# --------------------------------------------------------------------------------------------- contenders


class Autocast:
    """``model(x, t, y)`` under ``torch.autocast`` (``dtype``), output float32."""

    def __init__(self, model: Any, device: Any, dtype: Any):
        self.model, self.device, self.dtype = model, device, dtype

    def __call__(self, x: Any, t: Any, y: Any) -> Any:
        import torch

        with torch.autocast(self.device.type, dtype=self.dtype):
            return self.model(x, t, y).float()


def section_eager(rows: Rows, model: Any, batches: list[int], seed: int,
                  precisions: tuple[str, ...] = ("fp16", "bf16")) -> None:
    import torch

    set_tf32(False)
    for prec in precisions:
        fn = Autocast(model, rows.device, {"fp16": torch.float16, "bf16": torch.bfloat16}[prec])
        for b in batches:
            rows.measure(f"eager_{prec}", b, fn, device_inputs(model.config, b, rows.device, seed))


def _fixed_calibration(cfg: Any, seed: int, n: int = 16) -> Any:
    """A stand-in calibration set (x, t, y, len) from the fixed inputs: random weights have no data distribution."""
    f = fixed_inputs(cfg, n, seed)

    class Calib:
        x, t, y, sha256 = f["x"], f["t"], f["y"], None

        def __len__(self) -> int:
            return n

    return Calib()


def load_aoti(path: Path, device: Any) -> Callable[..., Any]:
    """The package loaded as ``ditdeploy sample`` loads it (``runtimes.aoti.load_package``: single-threaded, so a
    CUDA graph can capture it)."""
    from ditdeploy.runtimes.aoti import load_package

    return load_package(Path(path), device, trust_native_code=True)  # built by this run


def aoti_package(model: Any, precision: str, device: Any, workdir: Path, batch: tuple[int, int], seed: int) -> Any:
    """Build (``ditdeploy.export.aoti``, the CLI's path: the module is not moved here, it is on ``model``'s device)
    and load an AOTInductor package; returns the loaded callable."""
    from ditdeploy.export.aoti import compile_package, precision_module

    calib = _fixed_calibration(model.config, seed) if precision == "fp8" else None
    module, _ = precision_module(model, precision, calib)
    path = workdir / f"dit-{precision}.pt2"
    compile_package(module, model.config, path, device.type, batch)
    return load_aoti(path, device)


def aoti_skipped(rows: Rows, device_type: str, precisions: list[str],
                 toolkit: Callable[[], tuple[Any, str]] | None = None) -> bool:
    """On CUDA without a CUDA toolkit, every AOTI row is recorded as skipped with the one-line reason (and no
    compile is tried: each would fail after minutes of Inductor work); True when so."""
    if device_type != "cuda":
        return False
    from ditdeploy.runtimes.torch_env import find_cuda_toolkit

    home, line = (toolkit or find_cuda_toolkit)()
    rows.rec.data["cuda_toolkit"] = line
    if home is not None:
        return False
    print(f"[gpu_engines] AOTI skipped: {line}", file=sys.stderr, flush=True)
    for prec in precisions:
        for name in (f"aoti_{prec}", f"aoti_{prec}_graph"):
            rows.note(name, f"skipped: {line}")
    return True


def measure_package(rows: Rows, name: str, fn: Callable[..., Any], batches: list[int], graph_batches: list[int],
                    cfg: Any, seed: int) -> None:
    """``name`` plain at every batch, then replayed as a CUDA graph at ``graph_batches`` (plain rows first: a
    capture that fails cannot cost them); each graph is captured inside its own row's guard."""
    for b in batches:
        rows.measure(name, b, fn, device_inputs(cfg, b, rows.device, seed))
    for b in graph_batches:
        args = device_inputs(cfg, b, rows.device, seed)
        rows.measure(f"{name}_graph", b, None, args, build=lambda args=args: cuda_graphed(fn, args))


def section_aoti(rows: Rows, model: Any, precision: str, batches: list[int], workdir: Path, seed: int,
                 graph_batches: list[int] | None = None) -> Any:
    """AOTI ``precision`` plain and (on CUDA) as CUDA graphs; returns the loaded package (or None)."""
    if precision == "fp8" and importlib.util.find_spec("ditdeploy.export.fp8") is None:
        rows.note("aoti_fp8", "HOOK: ditdeploy.export.fp8 is not on this checkout; FP8 not measured")
        return None
    if importlib.util.find_spec("ditdeploy.export.aoti") is None:
        rows.note(f"aoti_{precision}", "HOOK: ditdeploy.export.aoti is not on this checkout; AOTI not measured")
        return None
    from ditdeploy.errors import DitDeployError
    from ditdeploy.export.aoti import check_target

    try:
        check_target(rows.device.type, precision)
    except DitDeployError as e:  # e.g. fp8 on a GPU without FP8 tensor cores: said, not faked
        rows.note(f"aoti_{precision}", f"not measured: {e}")
        return None
    t0 = time.perf_counter()
    pkg = aoti_package(model, precision, rows.device, workdir, (1, max(batches)), seed)
    rows.rec.put("compile_s", f"aoti_{precision}", round(time.perf_counter() - t0, 1))
    graphs = (batches if graph_batches is None else graph_batches) if rows.device.type == "cuda" else []
    measure_package(rows, f"aoti_{precision}", pkg, batches, graphs, model.config, seed)
    if rows.device.type != "cuda":
        rows.note(f"aoti_{precision}_graph", "CUDA graphs need a CUDA device: not measured here")
    return pkg


def section_compile(rows: Rows, model: Any, batches: list[int], seed: int) -> None:
    """``torch.compile(mode="max-autotune")`` of the bf16-autocast model, static shapes (a compile per batch)."""
    import torch

    fn = torch.compile(Autocast(model, rows.device, torch.bfloat16), mode="max-autotune", dynamic=False)
    for b in batches:
        t0 = time.perf_counter()
        args = device_inputs(model.config, b, rows.device, seed)
        with torch.inference_mode():
            fn(*args)
        rows.rec.put("compile_s", f"compile_bf16/b{b}", round(time.perf_counter() - t0, 1))
        rows.measure("compile_bf16", b, fn, args)


def section_tensorrt(rows: Rows, model: Any, batches: list[int], workdir: Path, seed: int) -> None:
    """fp16 ONNX -> TensorRT engine (profile over ``batches``) -> ``TensorRTDenoiser`` per numpy call."""
    import torch

    from ditdeploy.export.onnx import export_denoiser_onnx
    from ditdeploy.export.tensorrt import build_engine
    from ditdeploy.runtimes.tensorrt import TensorRTDenoiser

    onnx_path, plan = workdir / "dit-fp16.onnx", workdir / "dit-fp16.plan"
    t0 = time.perf_counter()
    export_denoiser_onnx(model, onnx_path, precision="fp16", verify=False, progress=False)  # traced from host
    build_engine(onnx_path, plan, min_batch=min(batches), opt_batch=batches[len(batches) // 2],
                 max_batch=max(batches), progress=False)
    rows.rec.put("compile_s", "tensorrt_fp16", round(time.perf_counter() - t0, 1))
    den = TensorRTDenoiser(plan)
    for b in batches:
        f = fixed_inputs(model.config, b, seed)
        rows.measure("tensorrt_fp16", b, lambda *_, f=f: torch.from_numpy(den(f["x"], f["t"], f["y"])), (),
                     timing="numpy call incl. host<->device copies")
    den.close()


# --------------------------------------------------------------------------------------------- end to end


def run_e2e(rec: Recorder, name: str, den: Callable[..., np.ndarray], cfg: Any, device: Any, images: int,
            steps: int, seed: int, ref_x0: np.ndarray | None) -> np.ndarray:
    """DDIM ``steps``, cfg 4, ``images`` images: wall, denoiser share, and x0 vs the fp32 eager run."""
    import torch

    from ditdeploy.diffusion import sample
    from ditdeploy.runtimes import Timed

    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((images, cfg.in_channels, cfg.input_size, cfg.input_size), dtype=np.float32)
    labels = (np.arange(images, dtype=np.int64) * 97) % cfg.num_classes
    kw = dict(method="ddim", cfg_scale=CFG_SCALE, num_classes=cfg.num_classes, seed=seed)
    sample(den, noise, labels, steps=2, **kw)  # warm-up (graphs captured, kernels loaded)
    timed = Timed(den)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    x0 = sample(timed, noise, labels, steps=steps, **kw)
    wall = time.perf_counter() - t0
    rec.put("e2e", name, {
        "method": "ddim", "steps": steps, "cfg_scale": CFG_SCALE, "images": images, "denoiser_batch": 2 * images,
        "wall_s": round(wall, 4), "images_per_s": round(images / wall, 3), "denoiser_s": round(timed.seconds, 4),
        "denoiser_calls": timed.calls, "x0_finite": bool(np.isfinite(x0).all()),
        "x0_vs_fp32_eager": metrics(x0, ref_x0) if ref_x0 is not None else None,
    })
    return x0


def section_e2e(rec: Recorder, model: Any, device: Any, fast: tuple[str, Callable[..., Any]] | None, images: int,
                steps: int, seed: int) -> None:
    """fp32 eager and ``fast`` (a CUDA graph per batch on a GPU) through the runtimes' numpy staging
    (``runtimes.cuda_staging.StagedCall``: pinned host buffers, one stream)."""
    set_tf32(False)
    ref = run_e2e(rec, "eager_fp32", _numpy_call(model, device, False), model.config, device, images, steps, seed,
                  None)
    if fast is not None:
        name, fn = fast
        graph = device.type == "cuda"
        run_e2e(rec, name + ("_graph" if graph else ""), _numpy_call(_first(fn), device, graph), model.config,
                device, images, steps, seed, ref)


def _numpy_call(fn: Callable[..., Any], device: Any, graph: bool) -> Callable[..., np.ndarray]:
    """numpy (x, t, y) -> ``fn`` -> numpy: ``runtimes.cuda_staging.StagedCall`` on a GPU, a plain call on a CPU."""
    import torch

    if device.type == "cuda":
        from ditdeploy.runtimes.cuda_staging import StagedCall

        return StagedCall(fn, device, graph=graph)

    def call(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return _tensor(fn(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (x, t, y)))).float().numpy()

    return call


# --------------------------------------------------------------------------------------------- the run


# ``--plan first``: the rows a first, short GPU run must not miss, most valuable first (<= 5 minutes on an H100 with
# the install: gpu_run.sh first). Per AOTI precision: plain batches, then CUDA-graph batches (empty: none).
FIRST_PLAN = {"batches": [2, 32], "sections": ["eager", "aoti"], "eager_precisions": ["bf16"],
              "aoti": {"bf16": {"batches": [2, 32], "graph_batches": [2, 32]},
                       "fp8": {"batches": [32], "graph_batches": []}}}
NEEDS_S_FIRST = {"aoti": 30}  # first plan: a compile cut by the timeout loses nothing already written


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Variant, batches, counts and sections of this run (``--tiny``: digits, one batch, tiny counts;
    ``--plan first``: :data:`FIRST_PLAN`)."""
    tiny, first = args.tiny, args.plan == "first"
    batches = [2] if tiny else FIRST_PLAN["batches"] if first else [int(b) for b in args.batches.split(",")]
    precisions = (args.aoti_precisions or ("bf16" if tiny and not first else
                                           ",".join(FIRST_PLAN["aoti"] if first else AOTI_PRECISIONS))).split(",")
    aoti = {p: (dict(FIRST_PLAN["aoti"][p]) if first and not tiny and p in FIRST_PLAN["aoti"]
                else {"batches": batches, "graph_batches": batches}) for p in precisions}
    return {
        "plan": args.plan, "variant": "digits" if tiny else args.variant, "image_size": 256,
        "batches": batches,
        "warmup": 1 if tiny else 5, "iters": 3 if tiny else 20,
        "e2e_steps": 3 if tiny else 50, "e2e_images": 2 if tiny else 8, "cfg_scale": CFG_SCALE,
        "sections": FIRST_PLAN["sections"] if first and args.sections is None else
        (args.sections or "eager,aoti,e2e,compile,tensorrt").split(","),
        "eager_precisions": FIRST_PLAN["eager_precisions"] if first else ["fp16", "bf16"],
        "budget_s": args.budget_s, "aoti_precisions": precisions, "aoti": aoti,
        "tensorrt_importable": importlib.util.find_spec("tensorrt") is not None,
        "aoti_module": importlib.util.find_spec("ditdeploy.export.aoti") is not None,
        "fp8_module": importlib.util.find_spec("ditdeploy.export.fp8") is not None,
    }


def _refs(model: Any, batches: list[int], device: Any, seed: int) -> dict[int, np.ndarray]:
    """fp32 eager (TF32 off) outputs per batch: the parity reference of every row."""
    import torch

    set_tf32(False)
    with torch.inference_mode():
        return {b: model(*device_inputs(model.config, b, device, seed)).to("cpu", torch.float64).numpy()
                for b in batches}


def run(rec: Recorder, st: dict[str, Any], device: Any, seed: int, workdir: Path) -> None:
    """All sections in order of importance, each guarded and budget-checked."""
    budget, sec = Budget(st["budget_s"]), set(st["sections"])
    with rec.guard("peak"):
        rec.data["bf16_matmul_peak"] = bf16_matmul_peak(device)
    model = random_copy(st["variant"], st["image_size"], seed).to(device).eval()
    rec.data["model"] = {"variant": st["variant"], "params": sum(p.numel() for p in model.parameters()),
                         "macs_per_image": model.config.macs(), "weights": "random (export.randomize, seed)"}
    rows = Rows(rec, model.config, device, (rec.data.get("bf16_matmul_peak") or {}).get("tflops"),
                _refs(model, st["batches"], device, seed), st["warmup"], st["iters"])
    if "eager" in sec:
        with rec.guard("eager"):
            section_eager(rows, model, st["batches"], seed, tuple(st["eager_precisions"]))
    packages: dict[str, Any] = {}
    from ditdeploy.runtimes.torch_env import api_problems

    rec.data["torch_api_problems"] = problems = api_problems()  # each names the feature and its minimum torch
    if "aoti" in sec and [p for p in problems if p.startswith(".pt2")]:
        for prec in st["aoti_precisions"]:
            rows.note(f"aoti_{prec}", "skipped: " + next(p for p in problems if p.startswith(".pt2")))
        sec.discard("aoti")
    if "aoti" in sec and aoti_skipped(rows, device.type, st["aoti_precisions"]):
        sec.discard("aoti")
    for i, prec in enumerate(st["aoti_precisions"] if "aoti" in sec else ()):
        if not _fits(rec, budget, "aoti", f"aoti_{prec}", st["plan"]):
            continue
        plan = st["aoti"][prec]
        with rec.guard(f"aoti {prec}"):
            packages[prec] = section_aoti(rows, model, prec, plan["batches"], workdir, seed, plan["graph_batches"])
        if i == 0 and "e2e" in sec and _fits(rec, budget, "e2e", "e2e"):
            _e2e(rec, model, device, packages, st, seed)
            sec.discard("e2e")
    if "e2e" in sec and _fits(rec, budget, "e2e", "e2e"):
        _e2e(rec, model, device, packages, st, seed)
    if "compile" in sec and _fits(rec, budget, "compile", "compile_bf16"):
        with rec.guard("compile max-autotune"):
            section_compile(rows, model, st["batches"], seed)
    if "tensorrt" in sec:
        if not st["tensorrt_importable"]:
            rows.note("tensorrt_fp16", "TensorRT is not importable on this machine: not measured")
        elif _fits(rec, budget, "tensorrt", "tensorrt_fp16"):
            with rec.guard("tensorrt"):
                section_tensorrt(rows, model, st["batches"], workdir, seed)


def _fits(rec: Recorder, budget: Budget, section: str, name: str, plan: str = "engines") -> bool:
    need = (NEEDS_S_FIRST if plan == "first" else NEEDS_S).get(section, NEEDS_S.get(section, 0))
    if budget.left() >= need:
        return True
    rec.put("notes", name, f"skipped: {budget.left():.0f} s of the budget left, the section needs ~{need} s")
    return False


def _e2e(rec: Recorder, model: Any, device: Any, packages: dict[str, Any], st: dict[str, Any], seed: int) -> None:
    import torch

    fast = (("aoti_bf16", packages["bf16"]) if packages.get("bf16") is not None
            else ("eager_bf16", Autocast(model, device, torch.bfloat16)))
    with rec.guard("e2e"):
        section_e2e(rec, model, device, fast, st["e2e_images"], st["e2e_steps"], seed)


def summarize(d: dict[str, Any]) -> str:
    """Markdown tables of a ``gpu_engines.json``: per-call rows, end to end, notes (numbers as recorded)."""
    peak = d.get("bf16_matmul_peak") or {}
    cuda = d.get("cuda") or {}
    lines = [f"# gpu_engines: {d.get('settings', {}).get('variant')} 256, {d.get('started')}", "",
             f"Device: {cuda.get('name') or cuda.get('devices') or d.get('device')}; bf16 matmul peak measured: "
             f"{peak.get('tflops')} TFLOP/s (n={peak.get('n')}). Parity: vs fp32 eager (TF32 off), same inputs.", "",
             "| contender | batch | ms/call | TFLOP/s | % bf16 peak | rel-L2 | cosine |", "|---|---|---|---|---|---|---|"]
    for r in (d.get("rows") or {}).values():
        if "error" in r:
            lines.append(f"| {r['contender']} | {r['batch']} | error: {r['error'][:80]} | | | | |")
            continue
        p = r["parity_vs_fp32_eager"]
        lines.append(f"| {r['contender']} | {r['batch']} | {r['median_ms']:.3f} | {r['tflops']:.3g} | "
                     f"{r['pct_of_bf16_peak']} | {p['rel_l2']:.2e} | {p['cosine']:.6f} |")
    lines += ["", "| end to end (DDIM, cfg 4) | steps | images | wall s | images/s | x0 rel-L2 vs fp32 |",
              "|---|---|---|---|---|---|"]
    for name, e in (d.get("e2e") or {}).items():
        rel = (e.get("x0_vs_fp32_eager") or {}).get("rel_l2")
        lines.append(f"| {name} | {e['steps']} | {e['images']} | {e['wall_s']} | {e['images_per_s']} | "
                     f"{'-' if rel is None else f'{rel:.2e}'} |")
    lines += ["", "Compile seconds: " + ", ".join(f"{k} {v}" for k, v in (d.get("compile_s") or {}).items())]
    lines += [f"- {k}: {v}" for k, v in (d.get("notes") or {}).items()]
    lines += [f"- error in {k}: {v}" for k, v in (d.get("errors") or {}).items() if "." not in k]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--summarize"]:  # python -m experiments.gpu_engines --summarize gpu_engines.json
        print(summarize(json.loads(Path(argv[1]).read_text())), end="")
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_engines.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variant", default="XL/2")
    ap.add_argument("--batches", default="2,8,32")
    ap.add_argument("--sections", default=None, help="default eager,aoti,e2e,compile,tensorrt (--plan first: "
                    "eager,aoti)")
    ap.add_argument("--plan", choices=("engines", "first"), default="engines",
                    help="first: the short first run (FIRST_PLAN: eager bf16, AOTI bf16 b2/b32 +graphs, FP8 b32)")
    ap.add_argument("--aoti-precisions", default=None, help="default bf16,fp16,fp8 (--tiny: bf16)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="wall-clock budget of the measurements")
    ap.add_argument("--tiny", action="store_true", help="digits model, batch 2, tiny counts (CPU code-path check)")
    ap.add_argument("--dry-run", action="store_true", help="write the plan (settings, hooks found) and stop")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    st = settings(args)
    args.out.mkdir(parents=True, exist_ok=True)
    header = {"benchmark": "experiments.gpu_engines", "device": args.device, "argv": argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": st, "dry_run": args.dry_run}
    rec = Recorder(args.out / "gpu_engines.json", header)
    if args.dry_run:
        print(f"[gpu_engines] plan written to {rec.path}", file=sys.stderr)
        return
    import torch

    from ditdeploy.bench.machine import cuda_info, machine_info

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu --tiny")
    with rec.guard("machine"):
        rec.data["machine"], rec.data["cuda"] = machine_info(), cuda_info()
    with tempfile.TemporaryDirectory(prefix="gpu_engines_") as tmp, contextlib.ExitStack():
        run(rec, st, device, args.seed, Path(tmp))
    rec.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rec.flush()
    n_err = len([k for k in rec.data["errors"] if "." not in k])
    n_rows = len([r for r in (rec.data.get("rows") or {}).values() if "error" in r])
    print(f"[gpu_engines] wrote {rec.path} ({n_err} section error(s), {n_rows} row error(s))", file=sys.stderr)
    if n_err or n_rows:
        raise SystemExit(1)  # results kept; the exit status says something failed (gpu_run.sh passes it on)


if __name__ == "__main__":
    main()
