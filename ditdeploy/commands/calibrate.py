"""`ditdeploy calibrate`: capture an INT8 calibration set from real sampling trajectories.

Imports only typer + stdlib at module import; numpy, the sampler and the chosen runtime load inside the command.
"""

from __future__ import annotations

from pathlib import Path

import typer

_EPILOG = (
    "Examples: ditdeploy calibrate --out calib.npz (the shipped digits model) | "
    "ditdeploy calibrate --engine dit-xl-2-256-fp32.onnx --samples 16 --steps 50 --cfg-scale 4 --out xl-calib.npz | "
    "ditdeploy calibrate --checkpoint digits.safetensors --sampler ddpm --steps 250 --out calib.npz"
)


def register(app: typer.Typer) -> None:
    @app.command("calibrate", epilog=_EPILOG)
    def calibrate(
        out: Path = typer.Option(..., "--out", "-o", help="Calibration set to write (.npz; manifest beside it)."),
        checkpoint: Path = typer.Option(None, "--checkpoint", "-c",
                                        help="Torch checkpoint (.safetensors / .pt) run as the fp32 reference."),
        engine: Path = typer.Option(None, "--engine", "-e",
                                    help="An fp32 artifact (.onnx / .xml) to run instead of a checkpoint."),
        backend: str = typer.Option(None, "--backend", help="Runtime for --engine (default: by suffix)."),
        samples: int = typer.Option(32, "--samples", "-n", help="Trajectories (images) for the calibration set."),
        steps: int = typer.Option(50, "--steps", help="Sampling steps, as deployed."),
        sampler: str = typer.Option("ddim", "--sampler", help="ddim | ddpm | dpm-solver++, as deployed."),
        cfg_scale: float = typer.Option(4.0, "--cfg-scale", help="Guidance scale, as deployed (both CFG halves "
                                        "are captured when != 1)."),
        eta: float = typer.Option(0.0, "--eta", help="DDIM eta."),
        seed: int = typer.Option(0, "--seed", help="Seed of the calibration trajectories."),
        timesteps: int = typer.Option(25, "--timesteps", help="Denoiser calls kept per trajectory, evenly spread "
                                      "over it (all when --steps is smaller)."),
        val_samples: int = typer.Option(8, "--val-samples", help="Trajectories of the held-out validation set "
                                        "(0: none)."),
        val_seed: int = typer.Option(None, "--val-seed", "--val-seeds",
                                     help="Seed of the validation trajectories (default: --seed + 1000003)."),
        val_out: Path = typer.Option(None, "--val-out", help="Write the validation set to this .npz instead of "
                                     "into --out."),
        batch_size: int = typer.Option(16, "--batch-size", help="Trajectories sampled together."),
        threads: int = typer.Option(None, "--threads", help="Intra-op threads of the runtime."),
        image_size: int = typer.Option(None, "--image-size", help="Image size for bare official .pt checkpoints."),
    ) -> None:
        """Capture denoiser inputs (x_t, t, y) of both CFG halves over whole sampling trajectories for INT8."""
        import sys
        import time

        from ditdeploy.artifacts import sha256_file
        from ditdeploy.calibration.capture import CaptureSettings, capture_calibration_set, describe
        from ditdeploy.errors import DitDeployError
        from ditdeploy.manifest import Manifest
        from ditdeploy.runtimes import load

        settings = CaptureSettings(samples=samples, steps=steps, sampler=sampler, cfg_scale=cfg_scale, eta=eta,
                                   seed=seed, timesteps=timesteps, batch_size=batch_size, val_samples=val_samples,
                                   val_seed=val_seed)
        settings.validate()
        if checkpoint is not None and engine is not None:
            raise DitDeployError("pass either --checkpoint or --engine, not both")
        if checkpoint is not None:
            src, b = checkpoint, "torch"
        elif engine is not None:
            src, b = engine, backend
        else:
            from ditdeploy import shipped

            src, b = shipped.default_model(backend), backend
            typer.echo(f"no --checkpoint/--engine: calibrating the shipped default model {src.name}", err=True)
        if not Path(src).exists():
            raise DitDeployError(f"no such file: {src}")
        if threads is not None and threads < 1:
            raise DitDeployError(f"--threads must be >= 1, got {threads}")
        opts = {}
        if threads:
            opts["threads"] = threads
        if image_size is not None:
            opts["image_size"] = image_size
        from ditdeploy.outputs import check_outputs

        check_outputs({"--checkpoint/--engine": src}, {}, sets={"--out": out, "--val-out": val_out})
        den = load(src, backend=b, **opts)
        _check_memory(settings, den.config)
        precision = Manifest.of(den.manifest).precision
        if precision != "fp32":
            typer.secho(f"warning: {Path(src).name} is {precision}; calibrate from the fp32 model you will quantize",
                        fg="yellow", err=True)
        t0 = time.perf_counter()
        m = capture_calibration_set(
            den, out, settings, val_out=val_out,
            source={"path": Path(src).name, "sha256": sha256_file(src), "backend": den.name, "precision": precision},
            progress=sys.stderr.isatty(),
        )
        typer.echo(f"wrote {out}: {describe(m)} in {time.perf_counter() - t0:.1f} s")
        if val_out is not None and val_samples:
            typer.echo(f"wrote {val_out} (validation set)")


def _check_memory(settings, cfg) -> None:
    """The captured inputs are held in memory: refuse a count that cannot fit before sampling."""
    from ditdeploy.bounds import check_memory

    calls = min(settings.timesteps, settings.steps) * (2 if settings.cfg_scale != 1 else 1)
    n = (settings.samples + (settings.val_samples or 0)) * calls
    check_memory(n, 4 * cfg.in_channels * cfg.input_size ** 2, f"{n} captured denoiser inputs",
                 "lower --samples / --timesteps / --val-samples")
