"""`ditdeploy sample`: class-conditional sampling on any backend -> labelled grid image and/or ADM-layout npz.

Flags -> :class:`ditdeploy.run.generation.SampleRequest` -> :func:`ditdeploy.run.generation.generate`. Imports only typer +
stdlib at module import; numpy, the sampler and the chosen runtime load inside the command, and nothing on the path
imports torch unless ``--backend torch`` is chosen.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from ditdeploy.commands import _common as c
from ditdeploy.run.generation import DEFAULT_BATCH, DEFAULT_CFG, GRID_FORMATS

GridFormat = Enum("GridFormat", {k: k for k in GRID_FORMATS}, type=str)  # --output-format choices


def register(app: typer.Typer) -> None:
    @app.command("sample")
    def sample(
        engine: Path = c.engine_option("Denoiser artifact (.onnx, .xml, .plan/.engine, .pt2, .safetensors/.pt). "
                                       "Default: the shipped digits model."),
        backend: c.Backend = c.backend_option(),
        vae: Path = c.vae_option(),
        threads: int = c.threads_option(),
        provider: str = c.provider_option(),
        precision_hint: c.PrecisionHint = c.precision_hint_option(),
        image_size: int = typer.Option(None, "--image-size", min=8, help="Image size for bare official .pt "
                                       "checkpoints (torch backend).", rich_help_panel=c.PANEL_MODEL),
        device: str = typer.Option(None, "--device", help="torch backend: cpu | cuda; aoti: the .pt2's device "
                                   "(default).", rich_help_panel=c.PANEL_MODEL),
        cuda_graph: bool = c.cuda_graph_option("CUDA only (torch, aoti, tensorrt): replay a "
                                        "captured CUDA graph per batch size."),
        trust_native_code: bool = c.trust_native_code_option(),
        labels: str = typer.Option(None, "--labels", help="Comma-separated class ids or names (the model's "
                                   "id2label, case-insensitive), e.g. 207,360 or \"golden retriever, volcano\".",
                                   rich_help_panel=c.PANEL_SAMPLING),
        num_per_label: int = typer.Option(None, "--num-per-label", min=1, help="Images per class (all classes "
                                          "unless --labels).", rich_help_panel=c.PANEL_SAMPLING),
        sampler: c.Sampler = c.sampler_option(),
        steps: int = c.steps_option(50),
        cfg_scale: float = typer.Option(None, "--cfg-scale", min=0.0, help=f"Classifier-free guidance scale (1 = "
                                        f"off; default {DEFAULT_CFG:g}, or 1 for models without a null class).",
                                        rich_help_panel=c.PANEL_SAMPLING),
        eta: float = typer.Option(0.0, "--eta", min=0.0, help="DDIM eta (0 = deterministic).",
                                  rich_help_panel=c.PANEL_SAMPLING),
        seed: int = c.seed_option(),
        batch_size: int = typer.Option(None, "--batch-size", min=1, help=f"Images per sampler batch (default "
                                       f"{DEFAULT_BATCH}); the runtime chunks to the artifact's max batch.",
                                       rich_help_panel=c.PANEL_SAMPLING),
        guide_all_channels: bool = typer.Option(False, "--guide-all-channels", help="Apply CFG to all eps "
                                                "channels, not the official first 3.",
                                                rich_help_panel=c.PANEL_SAMPLING),
        cfg_interval: str = c.cfg_interval_option("LO,HI: guidance only at original timesteps "
                                         "LO..HI (inclusive, 0..999); other steps run the conditional half only."),
        cache_interval: int = c.cache_interval_option("N: feature reuse, every N-th step "
                                           "computes all blocks (torch, or an `export --cache-graphs` artifact)."),
        out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="Labelled grid image.",
                                 rich_help_panel=c.PANEL_OUTPUT),
        output_format: GridFormat = typer.Option(None, "--output-format", help="Grid image format (default: from "
                                                 "--out's suffix, else png).", rich_help_panel=c.PANEL_OUTPUT),
        no_out: bool = typer.Option(False, "--no-out", help="Do not write the grid (e.g. with --npz).",
                                    rich_help_panel=c.PANEL_OUTPUT),
        npz: Path = typer.Option(None, "--npz", help="Write arr_0 (N,H,W,C) uint8 + labels (ADM evaluator "
                                 "layout).", rich_help_panel=c.PANEL_OUTPUT),
        shards: int = typer.Option(1, "--shards", min=1, help="Split the images over N worker processes and "
                                   "merge.", rich_help_panel=c.PANEL_OUTPUT),
        json_out: Path = typer.Option(None, "--json", help="Write the run summary (work, GMACs, timings) here.",
                                      rich_help_panel=c.PANEL_OUTPUT),
        recipe: Path = typer.Option(None, "--recipe", help="A recipe from `ditdeploy tune`: its artifact, backend, "
                                    "threads, precision hint and less-work settings fill every flag not given.",
                                    rich_help_panel=c.PANEL_MODEL),
        progress: bool = c.progress_option(),
        shard: str = typer.Option(None, "--shard", hidden=True, help="INDEX/COUNT: sample only this shard."),
        server: str = typer.Option(None, "--server", help="http://HOST:PORT of a `ditdeploy serve` server: the "
                                   "images come from it (same labels, seeds and outputs as a local run).",
                                   rich_help_panel=c.PANEL_MODEL),
    ) -> None:
        """Sample class-conditional images on any backend; writes a labelled grid image and/or an npz.

        With no arguments: the shipped digits model on ONNX Runtime CPU, all 10 classes -> samples.png.
        """
        from ditdeploy.errors import DitDeployError
        from ditdeploy.run import generation, shard_workers

        if no_out and npz is None:
            raise DitDeployError("nothing to write: pass --out FILE and/or --npz FILE")
        req = generation.SampleRequest(
            engine=engine, backend=c.value(backend), vae=vae,
            labels=generation.parse_label_spec(labels) if labels is not None else None, num_per_label=num_per_label,
            sampler=c.value(sampler), steps=steps, cfg_scale=cfg_scale, eta=eta, seed=seed, batch_size=batch_size,
            out=None if no_out else out, output_format=c.value(output_format), npz=npz, shards=shards,
            shard=list(shard_workers.parse_shard(shard)) if shard else None, guide_all_channels=guide_all_channels,
            progress=c.progress_on(progress),
            options={"threads": threads, "providers": provider, "precision_hint": c.value(precision_hint),
                     "image_size": image_size, "device": device and device.lower(), "cuda_graph": cuda_graph or None,
                     "trust_native_code": trust_native_code or None},
            cfg_interval=cfg_interval,
            cache_interval=cache_interval, json_summary=json_out, server=server,
        )
        if recipe is not None:
            from ditdeploy.run.recipes import apply_recipe

            req = apply_recipe(req, recipe, say=lambda s: typer.echo(s, err=True))
        res = generation.generate(req, say=lambda s: typer.echo(s, err=True))
        for line in generation.describe(req, res):
            typer.echo(line, err=True)
