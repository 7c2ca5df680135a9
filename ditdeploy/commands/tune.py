"""`ditdeploy tune`: time candidate recipes, price their quality, and save the fastest within budget.

Candidates are timed on this machine; the fastest within the quality budget is written as a recipe file for
`ditdeploy sample --recipe`.

Flags -> :class:`ditdeploy.proof.tuner.TuneRequest` -> :func:`ditdeploy.proof.tuner.tune`. Imports only typer
and stdlib at module import.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ditdeploy.commands import _common as c

_EPILOG = (
    "Examples: ditdeploy tune --engine digits.onnx --engine digits-pair.onnx --engine digits-pair-int8.onnx "
    "--out recipe.json | ditdeploy tune --engine xl2-pair.onnx --engine xl2-pair-int8.onnx --sampler dpm-solver++ "
    "--steps 25 --images 1 --rounds 2 --out xl2-recipe.json --json tune.json --plot tune.png | "
    "then: ditdeploy sample --recipe recipe.json"
)


def _ints(text: str | None, flag: str) -> list[int] | None:
    from ditdeploy.errors import DitDeployError

    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise DitDeployError(f"{flag} takes comma-separated integers, got {text!r}") from e


def _words(text: str | None) -> list[str] | None:
    return None if text is None else [v.strip() for v in text.split(",") if v.strip()]


def register(app: typer.Typer) -> None:
    @app.command("tune", epilog=_EPILOG)
    def tune(
        engine: list[Path] = typer.Option(..., "--engine", "-e", help="Artifacts of one model to choose from "
                                          "(repeat): fp32 (the first is the quality reference), INT8, "
                                          "--cache-graphs pairs.", rich_help_panel=c.PANEL_MODEL),
        backends: str = typer.Option(None, "--backends", help="Comma-separated runtimes to try (default: "
                                     "onnxruntime,openvino where installed).", rich_help_panel=c.PANEL_MODEL),
        hints: str = typer.Option(None, "--precision-hints", help="OpenVINO precision hints to try (default: f32, "
                                  "plus bf16 where the CPU has bf16).", rich_help_panel=c.PANEL_MODEL),
        vae: Path = c.vae_option(),
        threads: str = typer.Option(None, "--threads", help="Comma-separated thread counts to try (default: "
                                    "physical cores).", rich_help_panel=c.PANEL_MODEL),
        less_work: str = typer.Option(None, "--less-work", help="Comma-separated of full, interval, cache, "
                                      "interval+cache (default: all that apply; cache needs a pair).",
                                      rich_help_panel=c.PANEL_SAMPLING),
        cfg_interval: str = c.cfg_interval_option("LO,HI of the 'interval' candidates (default 150,750)."),
        cache_interval: int = c.cache_interval_option("N of the 'cache' candidates (default 2)."),
        sampler: c.Sampler = c.sampler_option("Sampler of the workload tuned for."),
        steps: int = c.steps_option(50, "Steps of the workload tuned for."),
        cfg_scale: float = typer.Option(None, "--cfg-scale", min=0.0, help="Guidance scale (default: sample's).",
                                        rich_help_panel=c.PANEL_SAMPLING),
        seed: int = c.seed_option("Seed of every candidate's images (the same for all)."),
        images: int = typer.Option(8, "--images", min=1, max=4096, help="Images per timed run.",
                                   rich_help_panel=c.PANEL_SAMPLING),
        rounds: int = typer.Option(3, "--rounds", min=1, max=100, help="Interleaved timing rounds (median).",
                                   rich_help_panel=c.PANEL_SAMPLING),
        fid: bool = typer.Option(None, "--fid/--no-fid", help="Price candidates in FID (default: on for the "
                                 "digits model, offline extractor).", show_default=False,
                                 rich_help_panel=c.PANEL_CHECK),
        fid_samples: int = typer.Option(1000, "--fid-samples", min=10, max=100000, help="Images per FID run.",
                                        rich_help_panel=c.PANEL_CHECK),
        min_cosine: float = typer.Option(None, "--min-call-cosine", min=0.0, max=1.0, help="Budget: worst "
                                         "per-call cosine vs fp32 (default: the int8 limit, 0.99).",
                                         rich_help_panel=c.PANEL_CHECK),
        max_fid_delta: float = typer.Option(0.1, "--max-fid-delta", help="Budget: FID delta vs fp32 full work "
                                            "(where FID is measured).", rich_help_panel=c.PANEL_CHECK),
        max_drift: float = typer.Option(None, "--max-drift", min=0.0, help="Budget: latent drift rel-L2 vs fp32 "
                                        "full work (default 0.2 where FID is not measured).",
                                        rich_help_panel=c.PANEL_CHECK),
        out: Path = typer.Option(Path("recipe.json"), "--out", "-o", help="Recipe file to write (JSON).",
                                 rich_help_panel=c.PANEL_OUTPUT),
        json_out: Path = typer.Option(None, "--json", help="Write every row (speed, quality, machine) as JSON.",
                                      rich_help_panel=c.PANEL_OUTPUT),
        plot: Path = typer.Option(None, "--plot", help="Write speed vs quality as a PNG (needs matplotlib).",
                                  rich_help_panel=c.PANEL_OUTPUT),
        state: Path = typer.Option(None, "--state", help="Resume file (default: OUT.state.json; rerun the same "
                                   "command to resume).", rich_help_panel=c.PANEL_OUTPUT),
        progress: bool = c.progress_option(),
    ) -> None:
        """Find this machine's fastest recipe within a quality budget; write it for `sample --recipe`."""
        from ditdeploy.artifact.files import write_json_atomic
        from ditdeploy.artifact.output_policy import check_outputs
        from ditdeploy.diffusion import parse_cfg_interval
        from ditdeploy.proof import tuner
        from ditdeploy.run.recipes import save_recipe

        st = state if state is not None else out.with_name(out.name + ".state.json")
        check_outputs({"--engine": list(engine), "--vae": vae},
                      {"--out": out, "--json": json_out, "--plot": plot, "--state": st})
        iv = parse_cfg_interval(cfg_interval)
        req = tuner.TuneRequest(
            engines=list(engine), vae=vae, backends=_words(backends), hints=_words(hints),
            threads=_ints(threads, "--threads"),
            less_work=_words(less_work), cfg_interval=list(iv) if iv else [150, 750],
            cache_interval=cache_interval or 2, sampler=c.value(sampler), steps=steps, cfg_scale=cfg_scale,
            seed=seed, images=images, rounds=rounds, fid=fid, fid_samples=fid_samples, min_call_cosine=min_cosine,
            max_fid_delta=max_fid_delta, max_drift=max_drift, state=st, progress=c.progress_on(progress))
        res = tuner.tune(req)
        typer.echo(tuner.format_table(res))
        save_recipe(out, tuner.recipe_of(res, out))
        if json_out is not None:
            write_json_atomic(json_out, res)
        if plot is not None:
            tuner.write_plot(res, plot)
        typer.echo(f"wrote recipe {out} ({res['pick']['key']}, {res['pick']['speedup_vs_reference']:.2f}x the "
                   f"fp32 reference); use it: ditdeploy sample --recipe {out}")
