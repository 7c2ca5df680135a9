"""`ditdeploy bench`: speed, memory, size and roofline of artifacts per backend, precision and batch.

The harness lives in ``ditdeploy.bench`` (the repository's ``bench/`` folder); this module only wires the CLI.
"""

from __future__ import annotations

from pathlib import Path

import typer


def default_backends(path: Path) -> list[str]:
    """Backends that read ``path``: ONNX on ONNX Runtime and OpenVINO (f32, plus the bf16 hint on CPUs with native
    bf16), OpenVINO IR on OpenVINO, engines on TensorRT."""
    import importlib.util

    suffix = path.suffix.lower()
    if suffix == ".onnx":
        out = ["onnxruntime"]
        if importlib.util.find_spec("openvino") is not None:
            out.append("openvino")
            if _cpu_has_bf16():
                out.append("openvino:bf16")
        return out
    if suffix == ".xml":
        return ["openvino"] + (["openvino:bf16"] if _cpu_has_bf16() else [])
    if suffix in (".plan", ".engine", ".trt"):
        return ["tensorrt"]
    if suffix == ".pt2":
        return ["aoti"]
    return ["torch"]


def _cpu_has_bf16() -> bool:
    from ditdeploy.bench.machine import cpu_flags

    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(
        engine: list[Path] = typer.Option(None, "--engine", "-e",
                                          help="Artifact(s) to bench; repeat the option. Default: the shipped digits."),
        backends: str = typer.Option(
            None, "--backends",
            help="Comma-separated backends for every engine (onnxruntime, openvino, openvino:bf16, tensorrt). "
                 "Default: every installed backend that reads the file."),
        batch: str = typer.Option("1,2,8", "--batch", help="Denoiser batch sizes, comma-separated."),
        steps: int = typer.Option(10, "--steps", help="Sampling steps of the end-to-end run."),
        repeats: int = typer.Option(10, "--repeats", help="Timed denoiser calls per batch (after warm-up)."),
        warmup: int = typer.Option(2, "--warmup", help="Untimed calls before timing."),
        cfg_scale: float = typer.Option(4.0, "--cfg-scale", help="Guidance of the end-to-end run (doubles the batch)."),
        sampler: str = typer.Option("ddim", "--sampler", help="Sampler of the end-to-end run."),
        e2e: bool = typer.Option(True, "--e2e/--no-e2e", help="Also time a full sampling run per batch."),
        torch_baseline: bool = typer.Option(
            True, "--torch/--no-torch",
            help="Time torch eager fp32 on the same model for the speed-up column (when torch is installed)."),
        reference: Path = typer.Option(
            None, "--reference",
            help="Checkpoint for the torch baseline (default: the manifest's, the shipped digits, or random weights "
                 "of the same config: speed does not depend on the weights)."),
        vae: Path = typer.Option(None, "--vae", help="VAE decoder artifact for the end-to-end run (default: manifest's)."),
        threads: int = typer.Option(None, "--threads",
                                    help="Intra-op threads for every backend (default: each runtime's, = physical cores)."),
        probe: bool = typer.Option(True, "--probe/--no-probe", help="Measure this machine's matmul peak per precision."),
        probe_size: int = typer.Option(2048, "--probe-size", help="n of the n x n x n GEMM peak probe."),
        in_process: bool = typer.Option(False, "--in-process",
                                        help="Run targets in this process (faster start; RSS then accumulates)."),
        cuda_graph: bool = typer.Option(False, "--cuda-graph", help="CUDA only: torch/aoti/tensorrt targets replay "
                                        "CUDA graphs (per batch size)."),
        json_out: Path = typer.Option(None, "--json", help="Write the full results (machine, peaks, rows) as JSON."),
        cfg_interval: str = typer.Option(None, "--cfg-interval", help="LO,HI: end-to-end runs guide only at "
                                         "timesteps LO..HI."),
        cache_interval: int = typer.Option(None, "--cache-interval", help="N: end-to-end runs reuse features "
                                           "(torch, or `export --cache-graphs` artifacts)."),
        csv_out: Path = typer.Option(None, "--csv", help="Write one CSV line per row."),
        plot: Path = typer.Option(None, "--plot", help="Write a PNG plot (needs matplotlib)."),
    ) -> None:
        """Benchmark denoiser latency, end-to-end throughput, memory, size and FLOP/s per backend and batch."""
        from ditdeploy.artifacts import write_json_atomic
        from ditdeploy.bench import harness, report
        from ditdeploy.errors import DitDeployError
        from ditdeploy.generation import backend_options

        batches = harness.parse_batches(batch, "--batch")
        for name, v in (("--steps", steps), ("--repeats", repeats)):
            if v < 1:
                raise DitDeployError(f"{name} must be >= 1, got {v}")
        if warmup < 0:
            raise DitDeployError("--warmup must be >= 0")
        from ditdeploy.outputs import check_outputs

        check_outputs({"--engine": engine, "--reference": reference, "--vae": vae},
                      {"--json": json_out, "--csv": csv_out, "--plot": plot})
        engines = list(engine or [])
        if not engines:
            from ditdeploy import shipped

            engines = [shipped.default_model(None)]
        targets: list[harness.Target] = []
        baselines: dict[str, harness.Target] = {}
        from ditdeploy.checking import has_torch

        have_torch = has_torch()
        for p in engines:
            if not p.exists():
                raise DitDeployError(f"no such artifact: {p}")
            specs = [s.strip() for s in backends.split(",") if s.strip()] if backends else default_backends(p)
            m, cfg = _manifest_and_config(p)
            dec = _decoder_for(p, m, vae)
            for spec in specs:
                name, opts, label = harness.parse_backend_spec(spec)
                if threads:
                    opts["threads"] = threads
                if name == "torch":
                    continue  # the torch row is the baseline below
                opts.update(backend_options(name, {"cuda_graph": cuda_graph}))
                targets.append(harness.Target(label=f"{label} {p.name}" if len(engines) > 1 else label,
                                              backend=name, path=str(p), opts=opts, decoder=dec,
                                              env=_torch_env() if name == "aoti" else {}))
            if torch_baseline and have_torch and cfg is not None:
                key = cfg.to_json()
                if key not in baselines:
                    ref = _torch_reference(p, m, cfg, reference)
                    baselines[key] = harness.Target(
                        label="torch eager" + (f" {cfg.variant}" if len(engines) > 1 else ""), backend="torch",
                        path=str(ref) if ref else None, config=None if ref else _asdict(cfg), decoder=dec,
                        baseline=True, opts={"threads": threads} if threads else {}, env=_torch_env())
        targets = list(baselines.values()) + targets
        if not targets:
            raise DitDeployError("nothing to bench: no backend reads the given artifact(s)")
        from ditdeploy.diffusion import check_cache_interval, parse_cfg_interval

        interval = parse_cfg_interval(cfg_interval)
        check_cache_interval(cache_interval)
        settings = harness.Settings(batches=batches, steps=steps, repeats=repeats, warmup=warmup,
                                    cfg_scale=cfg_scale, sampler=sampler, e2e=e2e,
                                    cfg_interval=list(interval) if interval else None, cache_interval=cache_interval)
        result = harness.run_bench(targets, settings, probe=probe, probe_size=probe_size, in_process=in_process)
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


def _manifest_and_config(p: Path):
    from ditdeploy.manifest import Manifest

    m = Manifest.load(p, verify=False, required=False) or Manifest({}, p)
    return m, (m.config if m.config_dict is not None else None)


def _decoder_for(p: Path, m, vae: Path | None) -> str | None:
    if vae is not None:
        return str(vae)
    d = m.decoder_path()
    return str(d) if d is not None else None


def _torch_reference(p: Path, m, cfg, reference: Path | None) -> Path | None:
    """A checkpoint for the torch baseline: --reference, the manifest's, the shipped digits, or None (random)."""
    return reference if reference is not None else m.reference_checkpoint(shipped_fallback=True)
