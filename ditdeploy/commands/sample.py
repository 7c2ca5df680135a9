"""`ditdeploy sample`: class-conditional sampling on any backend -> labelled grid image and/or ADM-layout npz.

Flags -> :class:`ditdeploy.generation.SampleRequest` -> :func:`ditdeploy.generation.generate`. Imports only typer +
stdlib at module import; numpy, the sampler and the chosen runtime load inside the command, and nothing on the path
imports torch unless ``--backend torch`` is chosen.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ditdeploy.generation import DEFAULT_BATCH, DEFAULT_CFG, GRID_FORMATS


def register(app: typer.Typer) -> None:
    @app.command("sample")
    def sample(
        engine: Path = typer.Option(None, "--engine", "-e", help="Denoiser artifact (.onnx, .xml, .plan/.engine, "
                                    ".pt2, .safetensors/.pt). Default: the shipped digits model."),
        backend: str = typer.Option(None, "--backend", "-b", help="onnxruntime | openvino | tensorrt | aoti | "
                                    "torch (default: from the file suffix)."),
        vae: Path = typer.Option(None, "--vae", help="VAE decoder artifact for latent models (default: the "
                                 "manifest's 'decoder')."),
        labels: str = typer.Option(None, "--labels", help="Comma-separated class ids or names (the model's "
                                   "id2label, case-insensitive), e.g. 207,360 or \"golden retriever, volcano\"."),
        num_per_label: int = typer.Option(None, "--num-per-label", help="Images per class (all classes unless "
                                          "--labels)."),
        sampler: str = typer.Option("ddim", "--sampler", help="ddpm | ddim | dpm-solver++"),
        steps: int = typer.Option(50, "--steps", help="Sampling steps (model evaluations)."),
        cfg_scale: float = typer.Option(None, "--cfg-scale", help=f"Classifier-free guidance scale (1 = off; "
                                        f"default {DEFAULT_CFG:g}, or 1 for models without a null class)."),
        eta: float = typer.Option(0.0, "--eta", help="DDIM eta (0 = deterministic)."),
        seed: int = typer.Option(0, "--seed", help="Seed; image i's noise derives from (seed, i)."),
        batch_size: int = typer.Option(None, "--batch-size", help=f"Images per sampler batch (default "
                                       f"{DEFAULT_BATCH}); the runtime chunks to the artifact's max batch."),
        out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="Labelled grid image."),
        output_format: str = typer.Option(None, "--output-format", help=f"Grid image format: "
                                          f"{' | '.join(GRID_FORMATS)} (default: from --out's suffix, else png)."),
        no_out: bool = typer.Option(False, "--no-out", help="Do not write the PNG grid (e.g. with --npz)."),
        npz: Path = typer.Option(None, "--npz", help="Write arr_0 (N,H,W,C) uint8 + labels (ADM evaluator "
                                 "layout)."),
        shards: int = typer.Option(1, "--shards", help="Split the images over N worker processes and merge."),
        threads: int = typer.Option(None, "--threads", help="Intra-op threads (default: physical cores)."),
        provider: str = typer.Option(None, "--provider", help="onnxruntime providers, e.g. cpu or cuda,cpu."),
        precision_hint: str = typer.Option(None, "--precision-hint", help="openvino INFERENCE_PRECISION_HINT: "
                                           "f32 (default, parity) | bf16 | f16 | default."),
        guide_all_channels: bool = typer.Option(False, "--guide-all-channels", help="Apply CFG to all eps "
                                                "channels, not the official first 3."),
        image_size: int = typer.Option(None, "--image-size", help="Image size for bare official .pt checkpoints "
                                       "(torch backend)."),
        cfg_interval: str = typer.Option(None, "--cfg-interval", help="LO,HI: guidance only at original timesteps "
                                         "LO..HI (inclusive, 0..999); other steps run the conditional half only."),
        cache_interval: int = typer.Option(None, "--cache-interval", help="N: feature reuse, every N-th step "
                                           "computes all blocks (torch, or an `export --cache-graphs` artifact)."),
        json_out: Path = typer.Option(None, "--json", help="Write the run summary (work, GMACs, timings) here."),
        device: str = typer.Option(None, "--device", help="torch backend: cpu | cuda; aoti: the .pt2's device "
                                   "(default)."),
        cuda_graph: bool = typer.Option(False, "--cuda-graph", help="CUDA only (torch, aoti, tensorrt): replay a "
                                        "captured CUDA graph per batch size."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="tqdm bar over sampling steps."),
        shard: str = typer.Option(None, "--shard", hidden=True, help="INDEX/COUNT: sample only this shard."),
    ) -> None:
        """Sample class-conditional images on any backend; writes a labelled PNG grid and/or an npz.

        With no arguments: the shipped digits model on ONNX Runtime CPU, all 10 classes -> samples.png.
        """
        from ditdeploy import generation, sharding
        from ditdeploy.diffusion import parse_cfg_interval
        from ditdeploy.errors import DitDeployError

        if no_out and npz is None:
            raise DitDeployError("nothing to write: pass --out FILE and/or --npz FILE")

        req = generation.SampleRequest(
            engine=engine, backend=backend, vae=vae,
            labels=generation.parse_label_spec(labels) if labels is not None else None,
            num_per_label=num_per_label, sampler=sampler, steps=steps, cfg_scale=cfg_scale, eta=eta, seed=seed,
            batch_size=batch_size, out=None if no_out else out, output_format=output_format, npz=npz, shards=shards,
            shard=list(sharding.parse_shard(shard)) if shard else None, guide_all_channels=guide_all_channels,
            progress=progress and os.environ.get("DITDEPLOY_NO_PROGRESS") != "1",
            options={"threads": threads, "providers": provider, "precision_hint": precision_hint,
                     "image_size": image_size, "device": device and device.lower(), "cuda_graph": cuda_graph or None},
            cfg_interval=list(iv) if (iv := parse_cfg_interval(cfg_interval)) else None,
            cache_interval=cache_interval, json_summary=json_out,
        )
        res = generation.generate(req, say=lambda s: typer.echo(s, err=True))
        for line in generation.describe(req, res):
            typer.echo(line, err=True)
