"""`ditdeploy calibrate`: capture an INT8 calibration set from real sampling trajectories.

Imports only typer + stdlib at module import; numpy, the sampler and the chosen runtime load inside the command.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ditdeploy.commands import _common as c

_EPILOG = (
    "Examples: ditdeploy calibrate --out calib.npz (the shipped digits model) | "
    "ditdeploy calibrate --engine dit-xl-2-256-fp32.onnx --out xl-calib.npz (1 trajectory: the work budget) | "
    "ditdeploy calibrate --engine dit-xl-2-256-fp32.onnx --samples 16 --steps 50 --cfg-scale 4 --out xl-calib.npz | "
    "ditdeploy calibrate --engine digits.safetensors --sampler ddpm --steps 250 --out calib.npz"
)


def register(app: typer.Typer) -> None:
    @app.command("calibrate", epilog=_EPILOG)
    def calibrate(
        out: Path = typer.Option(..., "--out", "-o", help="Calibration set to write (.npz; manifest beside it).",
                                 rich_help_panel=c.PANEL_OUTPUT),
        engine: Path = c.engine_option("The fp32 model to run: a torch checkpoint (.safetensors/.pt) or an "
                                       "artifact (.onnx/.xml). Default: the shipped digits model."),
        checkpoint: Path = typer.Option(None, "--checkpoint", "-c", hidden=True, help="Old spelling of --engine."),
        backend: c.Backend = c.backend_option(),
        threads: int = c.threads_option(),
        trust_native_code: bool = c.trust_native_code_option(),
        image_size: int = typer.Option(None, "--image-size", min=8, help="Image size for bare official .pt "
                                       "checkpoints.", rich_help_panel=c.PANEL_MODEL),
        samples: int = typer.Option(None, "--samples", "-n", min=1, help="Trajectories (images) for the "
                                    "calibration set. Default: as many as fit a work budget of 20 T denoiser "
                                    "multiply-accumulates (calibration + validation trajectories, counted for the "
                                    "model, --steps and guidance; the same on every machine), 1..32: 32 for the "
                                    "digits model and S/2 256, 1 for XL/2 256 at 50 guided steps.",
                                    show_default=False, rich_help_panel=c.PANEL_SAMPLING),
        steps: int = c.steps_option(50, "Sampling steps, as deployed."),
        sampler: c.Sampler = c.sampler_option("Sampler, as deployed."),
        cfg_scale: float = typer.Option(4.0, "--cfg-scale", min=0.0, help="Guidance scale, as deployed (both "
                                        "CFG halves are captured when != 1).", rich_help_panel=c.PANEL_SAMPLING),
        eta: float = typer.Option(0.0, "--eta", min=0.0, help="DDIM eta.", rich_help_panel=c.PANEL_SAMPLING),
        seed: int = c.seed_option("Seed of the calibration trajectories."),
        timesteps: int = typer.Option(25, "--timesteps", min=1, help="Denoiser calls kept per trajectory, evenly "
                                      "spread over it (all when --steps is smaller).",
                                      rich_help_panel=c.PANEL_SAMPLING),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="Trajectories sampled together.",
                                       rich_help_panel=c.PANEL_SAMPLING),
        val_samples: int = typer.Option(None, "--val-samples", min=0, help="Trajectories of the held-out validation "
                                        "set, sampled in the same batches (0: none; default: a quarter of --samples,"
                                        " 1..8, where they fit the work budget, else the calibration trajectories' "
                                        "calls that --timesteps did not keep: no extra denoiser calls).",
                                        show_default=False, rich_help_panel=c.PANEL_OUTPUT),
        val_seed: int = typer.Option(None, "--val-seed", "--val-seeds", min=0, help="Seed of the validation "
                                     "trajectories (default: --seed + 1000003).", rich_help_panel=c.PANEL_OUTPUT),
        val_out: Path = typer.Option(None, "--val-out", help="Write the validation set to this .npz instead of "
                                     "into --out.", rich_help_panel=c.PANEL_OUTPUT),
        progress: bool = c.progress_option(),
    ) -> None:
        """Capture denoiser inputs (x_t, t, y) of both CFG halves over whole sampling trajectories for INT8."""
        import time

        from ditdeploy.artifact.files import sha256_file
        from ditdeploy.artifact.manifest import Manifest
        from ditdeploy.calibration.capture import CaptureSettings, capture_calibration_set, describe
        from ditdeploy.sources.shipped import default_model

        settings = CaptureSettings(samples=samples, steps=steps, sampler=c.value(sampler), cfg_scale=cfg_scale,
                                   eta=eta, seed=seed, timesteps=timesteps, batch_size=batch_size,
                                   val_samples=val_samples, val_seed=val_seed)
        settings.validate()
        src = c.deprecated("--checkpoint", "--engine", checkpoint, engine)
        b = c.value(backend)
        if src is None:
            src = default_model(b)
            typer.echo(f"no --engine: calibrating the shipped default model {src.name}", err=True)
        c.existing(src)
        from ditdeploy.run.deployment import open_deployment

        dep = open_deployment(src, b, {"threads": threads, "image_size": image_size,
                                       "trust_native_code": trust_native_code or None})
        from ditdeploy.artifact.output_policy import check_outputs

        check_outputs({"--engine": src}, {}, sets={"--out": out, "--val-out": val_out})
        den = dep.denoiser
        plan = settings.plan(den.config)
        _check_memory(settings, plan, den.config)
        precision = Manifest.of(den.manifest).precision
        if precision != "fp32":
            typer.secho(f"warning: {Path(src).name} is {precision}; calibrate from the fp32 model you will quantize",
                        fg="yellow", err=True)
        t0 = time.perf_counter()
        m = capture_calibration_set(
            den, out, settings, val_out=val_out,
            source={"path": Path(src).name, "sha256": sha256_file(src), "backend": den.name, "precision": precision},
            progress=c.progress_on(progress),
        )
        typer.echo(f"wrote {out}: {describe(m)} in {time.perf_counter() - t0:.1f} s")
        if val_out is not None and plan.val_source:
            typer.echo(f"wrote {val_out} (validation set)")


def _check_memory(settings, plan, cfg) -> None:
    """The captured inputs are held in memory: refuse a count that cannot fit before sampling."""
    from ditdeploy.system.bounds import check_memory

    n = plan.captured_rows(settings)
    check_memory(n, 4 * cfg.in_channels * cfg.input_size ** 2, f"{n} captured denoiser inputs",
                 "lower --samples / --timesteps / --val-samples")
