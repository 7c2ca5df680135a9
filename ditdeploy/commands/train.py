"""`ditdeploy train`: train a DiT with the official recipe (torchrun DDP, EMA, AMP, resumable checkpoints).

DDP runs via torchrun; checkpoints are written atomically. Data: an ImageFolder through a local diffusers VAE,
or the bundled digits (``--preset digits``).

Imports only typer + stdlib at module import; torch loads inside the command.
"""

from __future__ import annotations

import json
import sys

import typer


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        out: str | None = typer.Option(None, "--out", "-o", help="Run folder: checkpoints/, metrics.jsonl, ema.safetensors."),
        preset: str | None = typer.Option(None, "--preset", help="Named recipe with its own data: 'digits' (sklearn 8x8 digits, pixel space, the shipped model)."),
        data: str | None = typer.Option(None, "--data", help="ImageFolder (ImageNet layout: DIR/<class>/<image>)."),
        vae: str | None = typer.Option(None, "--vae", help="Local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema); latents = sample * 0.18215."),
        model: str | None = typer.Option(None, "--model", help="Variant: S/2 .. XL/8 (default S/2; the digits preset uses 'digits')."),
        image_size: int | None = typer.Option(None, "--image-size", help="Image size in pixels (default 256)."),
        hidden_size: int | None = typer.Option(None, "--hidden-size", help="Override the variant's hidden size."),
        depth: int | None = typer.Option(None, "--depth", help="Override the variant's depth."),
        num_heads: int | None = typer.Option(None, "--num-heads", help="Override the variant's attention heads."),
        global_batch: int | None = typer.Option(None, "--global-batch", help="Global batch, split evenly over ranks (default 256)."),
        steps: int | None = typer.Option(None, "--steps", help="Total optimizer steps (default 400000; digits 2000)."),
        lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate (default 1e-4)."),
        weight_decay: float | None = typer.Option(None, "--weight-decay", help="AdamW weight decay (default 0)."),
        ema_decay: float | None = typer.Option(None, "--ema-decay", help="EMA decay per step (default 0.9999)."),
        seed: int | None = typer.Option(None, "--seed", help="Global seed: init, data order, per-step noise (default 0)."),
        precision: str | None = typer.Option(None, "--precision", help="fp32 | bf16 (autocast) | fp16 (autocast + GradScaler, CUDA only)."),
        grad_checkpointing: bool | None = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing", help="Recompute block activations in backward to save memory.", rich_help_panel="Switches"),
        compile: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile the model.", rich_help_panel="Switches"),
        device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda (default auto)."),
        num_workers: int | None = typer.Option(None, "--num-workers", help="Data-loader workers for image decoding."),
        flip: bool | None = typer.Option(None, "--flip/--no-flip", help="Random horizontal flips (ImageFolder; default on).", rich_help_panel="Switches"),
        precompute_latents: bool | None = typer.Option(None, "--precompute-latents/--no-precompute-latents", help="Encode the dataset once into a latent cache and train from it.", rich_help_panel="Switches"),
        latent_cache: str | None = typer.Option(None, "--latent-cache", help="Latent cache folder (default OUT/latents)."),
        log_every: int | None = typer.Option(None, "--log-every", help="Steps per metrics line (averaged)."),
        ckpt_every: int | None = typer.Option(None, "--ckpt-every", help="Steps between checkpoints."),
        keep: int | None = typer.Option(None, "--keep", help="Checkpoints to keep (newest)."),
        resume: str | None = typer.Option(None, "--resume", help="Continue from a checkpoint file or a run folder (its newest checkpoint)."),
        export_ema: str | None = typer.Option(None, "--export-ema", help="Where to write the EMA safetensors at the end (default OUT/ema.safetensors)."),
        threads: int | None = typer.Option(None, "--threads", help="torch CPU threads per process."),
        progress: bool | None = typer.Option(None, "--progress/--no-progress", help="tqdm progress bar (default on)."),
    ) -> None:
        """Train a DiT (mse + vb loss, AdamW, EMA); DDP with `torchrun --nproc_per_node N -m ditdeploy train ...`.

        Examples: `ditdeploy train --preset digits --out runs/digits`;
        `ditdeploy train --data imagenet/train --vae sd-vae-ft-ema --model XL/2 --out runs/xl2 --precompute-latents`.
        Resume after any interruption with the same command plus `--resume OUT`.
        """
        from pathlib import Path

        from ditdeploy.artifact.output_policy import check_outputs

        # a --resume run folder is rewritten by design; a --resume checkpoint file is an input
        check_outputs({"--data": data, "--vae": vae, "--resume": resume if resume and Path(resume).is_file() else None},
                      {"--export-ema": export_ema})
        from ditdeploy.training.loop import resolve_args
        from ditdeploy.training.loop import train as run_training

        given = {k: v for k, v in locals().items() if k not in ("Path", "check_outputs")}
        args, ck = resolve_args(given)
        summary = run_training(args, ck)
        if summary.get("world_size", 1) == 1 or _is_rank0():
            print(json.dumps({k: v for k, v in summary.items() if v is not None}), file=sys.stdout)


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
