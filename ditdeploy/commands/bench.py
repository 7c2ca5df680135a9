"""`ditdeploy bench`: speed, memory, size and roofline of artifacts per backend, precision and batch.

The harness lives in ``ditdeploy.bench`` (the repository's ``bench/`` folder); this module only wires the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ditdeploy.commands import _common as c

PANEL_SERVER = "Server load test (--server)"
MAX_CLIENTS = 1024  # closed-loop client threads
MAX_ARRIVALS = 20000  # expected Poisson arrivals of one open-loop run (each answered on its own thread)


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(
        engine: list[Path] = typer.Option(None, "--engine", "-e", rich_help_panel=c.PANEL_MODEL,
                                          help="Artifact(s) to bench; repeat the option. Default: the shipped digits."),
        backends: str = typer.Option(
            None, "--backends", rich_help_panel=c.PANEL_MODEL,
            help="Comma-separated backends for every engine (onnxruntime, openvino, openvino:bf16, tensorrt). "
                 "Default: every installed backend that reads the file."),
        threads: int = c.threads_option(),
        reference: Path = typer.Option(
            None, "--reference", rich_help_panel=c.PANEL_MODEL,
            help="Checkpoint for the torch baseline (default: the manifest's, the shipped digits, or random weights "
                 "of the same config: speed does not depend on the weights)."),
        vae: Path = typer.Option(None, "--vae", help="VAE decoder artifact for the end-to-end run (default: "
                                 "the manifest's).", rich_help_panel=c.PANEL_MODEL),
        batch_sizes: str = typer.Option("1,2,8", "--batch-sizes", help="Denoiser batch sizes, comma-separated.",
                                        rich_help_panel=c.PANEL_SAMPLING),
        batch: str = typer.Option(None, "--batch", hidden=True, help="Old spelling of --batch-sizes."),
        steps: int = c.steps_option(10, "Sampling steps of the end-to-end run (and of each --server request)."),
        repeats: int = typer.Option(10, "--repeats", min=1, help="Timed denoiser calls per batch (after warm-up).",
                                    rich_help_panel=c.PANEL_SAMPLING),
        warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed calls before timing.",
                                   rich_help_panel=c.PANEL_SAMPLING),
        cfg_scale: float = typer.Option(4.0, "--cfg-scale", min=0.0, help="Guidance of the end-to-end run "
                                        "(doubles the batch).", rich_help_panel=c.PANEL_SAMPLING),
        sampler: c.Sampler = c.sampler_option("Sampler of the end-to-end run."),
        e2e: bool = typer.Option(True, "--e2e/--no-e2e", help="Also time a full sampling run per batch.",
                                 rich_help_panel=c.PANEL_SAMPLING),
        torch_baseline: bool = typer.Option(
            True, "--torch/--no-torch", rich_help_panel=c.PANEL_SAMPLING,
            help="Time torch eager fp32 on the same model for the speed-up column (when torch is installed)."),
        probe: bool = typer.Option(True, "--probe/--no-probe", help="Measure this machine's matmul peak per "
                                   "precision.", rich_help_panel=c.PANEL_SAMPLING),
        probe_size: int = typer.Option(2048, "--probe-size", min=16, help="n of the n x n x n GEMM peak probe.",
                                       rich_help_panel=c.PANEL_SAMPLING),
        in_process: bool = typer.Option(False, "--in-process", rich_help_panel=c.PANEL_SAMPLING,
                                        help="Run targets in this process (faster start; RSS then accumulates)."),
        cuda_graph: bool = c.cuda_graph_option("CUDA only: torch/aoti/tensorrt targets replay "
                                        "CUDA graphs (per batch size)."),
        trust_native_code: bool = c.trust_native_code_option(),
        cfg_interval: str = c.cfg_interval_option("LO,HI: end-to-end runs guide only at "
                                         "timesteps LO..HI."),
        cache_interval: int = c.cache_interval_option("N: end-to-end runs reuse features "
                                           "(torch, or `export --cache-graphs` artifacts)."),
        json_out: Path = typer.Option(None, "--json", help="Write the full results (machine, peaks, rows) as JSON.",
                                      rich_help_panel=c.PANEL_OUTPUT),
        csv_out: Path = typer.Option(None, "--csv", help="Write one CSV line per row.",
                                     rich_help_panel=c.PANEL_OUTPUT),
        plot: Path = typer.Option(None, "--plot", help="Write a PNG plot (needs matplotlib).",
                                  rich_help_panel=c.PANEL_OUTPUT),
        server: str = typer.Option(None, "--server", rich_help_panel=PANEL_SERVER,
                                   help="Load-test a running generate server (ditdeploy serve, or an exported "
                                        "Triton repository) at this URL instead of benching artifacts."),
        rate: str = typer.Option(None, "--rate", rich_help_panel=PANEL_SERVER,
                                 help="Poisson arrivals, requests/s (seeded by --seed); a comma list runs each."),
        concurrency: str = typer.Option(None, "--concurrency", rich_help_panel=PANEL_SERVER,
                                        help="Closed loop: this many clients back to back; a comma list runs each."),
        duration: float = typer.Option(30.0, "--duration", min=0.1, max=86400.0, rich_help_panel=PANEL_SERVER,
                                       help="Seconds each --rate/--concurrency run sends requests."),
        slo: float = typer.Option(None, "--slo", min=0.0, rich_help_panel=PANEL_SERVER,
                                  help="Latency objective in seconds: report the share of requests within it."),
        baseline: int = typer.Option(8, "--baseline", min=0, max=10000, rich_help_panel=PANEL_SERVER,
                                     help="Requests sent one after another first, as the baseline (0: none)."),
        labels: str = typer.Option("0,1,2,3,4,5,6,7,8,9", "--labels", rich_help_panel=PANEL_SERVER,
                                   help="Classes (ids or names) cycled over the requests, one image each."),
        seed: int = c.seed_option("Seed of the arrivals; request i samples with seed + i."),
        metrics_url: str = typer.Option(None, "--metrics-url", rich_help_panel=PANEL_SERVER,
                                        help="Triton metrics endpoint for the denoiser counters when the server "
                                             "has no info model (default: the --server port + 2)."),
        progress: bool = c.progress_option(),
    ) -> None:
        """Benchmark denoiser latency, end-to-end throughput, memory, size and FLOP/s per backend and batch; with
        --server, load-test a running server (images/s, latency percentiles, mean denoiser batch)."""
        from ditdeploy.artifact.files import write_json_atomic
        from ditdeploy.bench import harness, report
        from ditdeploy.diffusion import check_settings
        from ditdeploy.errors import DitDeployError

        if server is not None:
            _load_test(server, engine, rate, concurrency, duration, slo, baseline, labels, seed, metrics_url, steps,
                       c.value(sampler), cfg_scale, json_out, plot, csv_out, progress)
            return
        if rate is not None or concurrency is not None:
            raise DitDeployError("--rate/--concurrency load-test a server: add --server URL")

        spec = c.deprecated("--batch", "--batch-sizes", batch, batch_sizes, default="1,2,8")
        batches = harness.parse_batches(spec, "--batch" if batch is not None else "--batch-sizes")
        from ditdeploy.artifact.output_policy import check_outputs

        check_outputs({"--engine": engine, "--reference": reference, "--vae": vae},
                      {"--json": json_out, "--csv": csv_out, "--plot": plot})
        targets = _targets(list(engine or []), backends, threads, vae, reference, torch_baseline, cuda_graph,
                           trust_native_code)
        interval = check_settings(c.value(sampler), steps, cfg_scale, 0.0, cfg_interval, cache_interval, flags=True)
        settings = harness.Settings(batches=batches, steps=steps, repeats=repeats, warmup=warmup,
                                    cfg_scale=cfg_scale, sampler=c.value(sampler), e2e=e2e,
                                    cfg_interval=list(interval) if interval else None, cache_interval=cache_interval)
        result = harness.run_bench(targets, settings, probe=probe, probe_size=probe_size, in_process=in_process,
                                   progress=c.progress_on(progress))
        typer.echo(report.format_table(result))
        if json_out is not None:
            write_json_atomic(json_out, result)
        if csv_out is not None:
            report.write_csv(result, csv_out)
        if plot is not None:
            report.write_plot(result, plot)
        if not result["rows"]:
            raise DitDeployError("every bench target failed: " + "; ".join(
                f"{e['target']}: {e['error']}" for e in result["errors"]))


def _numbers(spec: str | None, flag: str, kind: type) -> list:
    from ditdeploy.errors import DitDeployError

    if spec is None:
        return []
    try:
        vals = [kind(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or any(not v > 0 or v != v or v == float("inf") for v in vals):
        raise DitDeployError(f"{flag} takes positive numbers separated by commas, got {spec!r}")
    return vals


def _load_test(server: str, engine, rate: str | None, concurrency: str | None, duration: float, slo: float | None,
               baseline: int, labels: str, seed: int, metrics_url: str | None, steps: int, sampler: str,
               cfg_scale: float, json_out: Path | None, plot: Path | None, csv_out: Path | None,
               progress: bool | None) -> None:
    """``bench --server``: the load test of ``ditdeploy.bench.load``."""
    from ditdeploy.artifact.files import write_json_atomic
    from ditdeploy.artifact.output_policy import check_outputs
    from ditdeploy.bench import load
    from ditdeploy.bench.machine import machine_info
    from ditdeploy.errors import DitDeployError

    if engine:
        raise DitDeployError("--server load-tests a running server: drop --engine (the server chose its model)")
    if csv_out is not None:
        raise DitDeployError("--csv applies to artifact benches; --server writes --json and --plot")
    rates, clients = _numbers(rate, "--rate", float), _numbers(concurrency, "--concurrency", int)
    if not rates and not clients:
        raise DitDeployError("--server needs --rate R and/or --concurrency C (comma lists run one after another)")
    if any(c > MAX_CLIENTS for c in clients):
        raise DitDeployError(f"--concurrency above {MAX_CLIENTS} clients is not supported by this load generator")
    if any(r * duration > MAX_ARRIVALS for r in rates):
        raise DitDeployError(f"--rate x --duration expects more than {MAX_ARRIVALS} requests in one run (one thread "
                             "each): lower the rate or the duration")
    check_outputs({}, {"--json": json_out, "--plot": plot})
    spec = load.LoadSpec(url=server, rates=rates, concurrencies=clients, duration=duration, seed=seed, steps=steps,
                         sampler=sampler, cfg_scale=cfg_scale, slo=slo, baseline=baseline,
                         labels=[int(v) if v.isdigit() else v for v in (x.strip() for x in labels.split(","))
                                 if v] or [0],
                         metrics_url=metrics_url)
    say = (lambda s: typer.echo(s, err=True)) if c.progress_on(progress) else None
    load_before = os.getloadavg()
    result = load.run_load(spec, say=say)
    result["machine"] = machine_info() | {"loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}
    typer.echo(load.format_table(result))
    if json_out is not None:
        write_json_atomic(json_out, result)
    if plot is not None:
        load.write_plot(result, plot)
    if not any(r["completed"] for r in result["runs"]):
        raise DitDeployError("no request succeeded: " + "; ".join(
            dict.fromkeys(m for r in result["runs"] for m in r.get("error_messages", [])[:1])))


def _targets(engines: list[Path], backends: str | None, threads: int | None, vae: Path | None,
             reference: Path | None, torch_baseline: bool, cuda_graph: bool = False,
             trust_native_code: bool = False) -> list:
    """One harness target per (engine, backend), torch eager baselines first (one per model config)."""
    from ditdeploy.bench import harness
    from ditdeploy.errors import DitDeployError
    from ditdeploy.proof.reference_check import has_torch
    from ditdeploy.run.deployment import backend_options, open_deployment
    from ditdeploy.sources.shipped import default_model

    engines = engines or [default_model(None)]
    targets: list[harness.Target] = []
    baselines: dict[str, harness.Target] = {}
    have_torch = has_torch()
    for p in engines:
        if not p.exists():
            raise DitDeployError(f"no such artifact: {p}")
        specs = [s.strip() for s in backends.split(",") if s.strip()] if backends else harness.default_backends(p)
        dep = open_deployment(p, vae=vae)  # nothing loads here: the workers do
        cfg, dec = dep.config, dep.decoder_path()
        dec = str(dec) if dec is not None else None
        for spec in specs:
            name, opts, label = harness.parse_backend_spec(spec)
            if threads:
                opts["threads"] = threads
            if name == "torch":
                continue  # the torch row is the baseline below
            opts.update(backend_options(name, {"cuda_graph": cuda_graph, "trust_native_code": trust_native_code}))
            targets.append(harness.Target(label=f"{label} {p.name}" if len(engines) > 1 else label,
                                          backend=name, path=str(p), opts=opts, decoder=dec,
                                          env=_torch_env() if name == "aoti" else {}))
        if torch_baseline and have_torch and cfg is not None and cfg.to_json() not in baselines:
            ref = dep.reference_checkpoint(reference, required=False)  # None: random weights
            baselines[cfg.to_json()] = harness.Target(
                label="torch eager" + (f" {cfg.variant}" if len(engines) > 1 else ""), backend="torch",
                path=str(ref) if ref else None, config=None if ref else _asdict(cfg), decoder=dec,
                baseline=True, opts={"threads": threads} if threads else {}, env=_torch_env())
    targets = list(baselines.values()) + targets
    if not targets:
        raise DitDeployError("nothing to bench: no backend reads the given artifact(s)")
    return targets


def _torch_env() -> dict[str, str]:
    """Environment of the torch baseline's (and a .pt2's) worker: OpenMP threads that sleep instead of spinning when idle (as our
    ONNX Runtime sessions do). On a shared CPU, spinning OpenMP barriers made a small torch model 10-100x slower
    here (digits batch 2: 242 ms default vs 3.3 ms passive under load 10), which would flatter every speed-up.
    A user-set OMP_WAIT_POLICY is kept."""
    import os

    return {} if os.environ.get("OMP_WAIT_POLICY") else {"OMP_WAIT_POLICY": "PASSIVE"}


def _asdict(cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)
