"""`ditdeploy check`: prove an exported artifact computes what the PyTorch reference computes.

The comparison itself lives in ``ditdeploy.proof.reference_check``; this module only wires the CLI (typer + stdlib at import).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from ditdeploy.commands import _common as c


class Precision(str, Enum):
    """Precisions with a thresholds table in ``ditdeploy.proof.reference_check``."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"


def register(app: typer.Typer) -> None:
    @app.command("check")
    def check(
        engine: Path = c.engine_option("Artifact to check (.onnx, .xml, .plan, .pt2). Default: the shipped "
                                       "digits model."),
        backend: c.Backend = c.backend_option(),
        threads: int = c.threads_option(),
        provider: str = c.provider_option(),
        precision_hint: c.PrecisionHint = c.precision_hint_option(),
        device: str = typer.Option(None, "--device", help="torch/aoti artifact: cpu | cuda.",
                                   rich_help_panel=c.PANEL_MODEL),
        cuda_graph: bool = c.cuda_graph_option("CUDA only: run the artifact through CUDA "
                                        "graphs."),
        trust_native_code: bool = c.trust_native_code_option(),
        vae: Path = typer.Option(None, "--vae", help="VAE decoder artifact for image metrics (default: the "
                                 "manifest's).", rich_help_panel=c.PANEL_MODEL),
        reference: Path = typer.Option(
            None, "--reference", "-r", rich_help_panel=c.PANEL_MODEL,
            help="PyTorch checkpoint of the same model. Default: the manifest's, or the shipped digits weights "
                 "for the digits model."),
        golden: Path = typer.Option(None, "--golden", rich_help_panel=c.PANEL_MODEL,
                                    help="Compare against a golden file instead of torch (no torch needed)."),
        save_golden: Path = typer.Option(None, "--save-golden", rich_help_panel=c.PANEL_OUTPUT,
                                         help="Write the reference's inputs and outputs to this .npz (needs torch)."),
        sampler: c.Sampler = c.sampler_option("End-to-end sampler."),
        steps: int = c.steps_option(25, "End-to-end sampling steps."),
        cfg_scale: float = typer.Option(4.0, "--cfg-scale", min=0.0, help="Classifier-free guidance scale (end "
                                        "to end).", rich_help_panel=c.PANEL_SAMPLING),
        batch_size: int = typer.Option(4, "--batch-size", min=1, help="Images in the end-to-end run (probes use "
                                       "2x: both CFG halves).", rich_help_panel=c.PANEL_SAMPLING),
        batch: int = typer.Option(None, "--batch", min=1, hidden=True, help="Old spelling of --batch-size."),
        timesteps: int = typer.Option(8, "--timesteps", min=1, max=1000, help="Per-call probes at this many "
                                      "timesteps over 0..999.", rich_help_panel=c.PANEL_SAMPLING),
        seed: int = c.seed_option("Seed of noise, labels and stochastic samplers."),
        per_call_only: bool = typer.Option(False, "--per-call-only", help="Skip the end-to-end sampling run.",
                                           rich_help_panel=c.PANEL_SAMPLING),
        cfg_interval: str = c.cfg_interval_option("LO,HI: the artifact's end-to-end run guides "
                                         "only at timesteps LO..HI (the reference stays full work)."),
        cache_interval: int = c.cache_interval_option("N: the artifact's end-to-end run reuses "
                                           "features (every N-th step full); the reference stays full work."),
        precision: Precision = typer.Option(
            None, "--precision", rich_help_panel=c.PANEL_MODEL,
            help="The artifact's precision, whose thresholds apply. Default: what the runtime reports it runs."),
        th_call_rel_l2: float = typer.Option(None, "--threshold-call-rel-l2",
                                             help="Override: max per-call rel-L2.", rich_help_panel=c.PANEL_CHECK),
        th_call_cosine: float = typer.Option(None, "--threshold-call-cosine", help="Override: min per-call cosine.",
                                             rich_help_panel=c.PANEL_CHECK),
        th_latent_rel_l2: float = typer.Option(None, "--threshold-latent-rel-l2",
                                               help="Override: max end-to-end latent rel-L2.",
                                               rich_help_panel=c.PANEL_CHECK),
        th_psnr: float = typer.Option(None, "--threshold-psnr", help="Override: min end-to-end image PSNR (dB).",
                                      rich_help_panel=c.PANEL_CHECK),
        th_ssim: float = typer.Option(None, "--threshold-ssim", help="Override: min end-to-end image SSIM.",
                                      rich_help_panel=c.PANEL_CHECK),
        json_out: Path = typer.Option(None, "--json", help="Also write the full report as JSON here.",
                                      rich_help_panel=c.PANEL_OUTPUT),
        fid_ref: str = typer.Option(None, "--fid-ref", help="Also sample --fid-samples images with the artifact and "
                                    "with the torch reference (same seeds) and report their FID against this "
                                    "reference (an ADM npz, or 'digits') and the delta.", rich_help_panel="FID"),
        fid_samples: int = typer.Option(1000, "--fid-samples", min=2, help="Images per --fid-ref run (whole "
                                        "classes).", rich_help_panel="FID"),
        inception: Path = typer.Option(None, "--inception", help="FID InceptionV3 weights for --fid-ref (see "
                                       "`ditdeploy fid --help`).", rich_help_panel="FID"),
        trt_lint: Path = typer.Option(None, "--trt-lint", help="Static TensorRT-readiness lint of an ONNX (ops, "
                                      "attributes, Q/DQ rules; no GPU): exit 1 on a violation."),
        progress: bool = c.progress_option(),
    ) -> None:
        """Compare an artifact with the PyTorch reference per denoiser call and end to end; exit 1 on failure.

        With no arguments: the shipped digits model on ONNX Runtime against its PyTorch weights.
        """
        from ditdeploy.diffusion import check_cache_interval, check_settings
        from ditdeploy.errors import DitDeployError

        if trt_lint is not None:
            if engine is not None or save_golden is not None:
                raise DitDeployError("--trt-lint runs alone: drop --engine / --save-golden")
            _run_trt_lint(trt_lint, json_out)
            return
        if golden is not None and save_golden is not None:
            raise DitDeployError("--golden and --save-golden exclude each other: save on a torch machine, check elsewhere")
        if fid_ref is not None and (golden is not None or (engine is None and save_golden is not None)):
            raise DitDeployError("--fid-ref samples the artifact and its PyTorch reference: it needs --engine and "
                                 "does not combine with --golden")
        batch_size = c.deprecated("--batch", "--batch-size", batch, batch_size, default=4)
        from ditdeploy.system.bounds import check_batch

        check_batch(batch_size, "--batch-size")
        from ditdeploy.artifact.output_policy import check_outputs

        check_outputs({"--engine": engine, "--reference": reference, "--golden": golden, "--vae": vae,
                       "--inception": inception, "--fid-ref": _fid_ref_path(fid_ref)},
                      {"--json": json_out, "--save-golden": save_golden})
        interval = check_settings(c.value(sampler), steps, cfg_scale, 0.0, cfg_interval, cache_interval, flags=True)
        opts = {"threads": threads, "providers": provider, "precision_hint": c.value(precision_hint),
                "device": device, "cuda_graph": cuda_graph or None, "trust_native_code": trust_native_code or None}
        from ditdeploy.run.deployment import open_deployment

        dep = (open_deployment(engine, c.value(backend), opts, vae=vae)  # None: the shipped model
               if engine is not None or save_golden is None else None)
        art = dep.denoiser if dep is not None else None
        if art is not None:
            check_cache_interval(cache_interval, art)
        g, ref_path = _golden(dep, golden, save_golden, reference, vae,
                    dict(method=c.value(sampler), steps=steps, cfg_scale=cfg_scale, seed=seed, batch=batch_size,
                         n_timesteps=timesteps))
        if dep is None:
            return
        engine = dep.path
        th = dict(call_rel_l2=th_call_rel_l2, call_cosine=th_call_cosine, latent_rel_l2=th_latent_rel_l2,
                  psnr=th_psnr, ssim=th_ssim)
        fid = None
        if fid_ref is not None:
            fid = _fid_delta(dep, ref_path, fid_ref, fid_samples, inception, vae,
                             dict(sampler=c.value(sampler), steps=steps, cfg_scale=cfg_scale, seed=seed,
                                  cfg_interval=list(interval) if interval is not None else None,
                                  cache_interval=cache_interval))
        _compare(dep, g, c.value(precision), th, json_out,
                 dict(run_e2e=not per_call_only, progress=c.progress_on(progress), cfg_interval=interval,
                      cache_interval=cache_interval), fid)


def _golden(dep, golden: Path | None, save_golden: Path | None, reference: Path | None, vae: Path | None,
            settings: dict):
    """The reference outputs: read from ``golden``, or computed by the PyTorch reference (and saved). ``dep``: the
    artifact's deployment (None: ``--save-golden`` from ``--reference`` alone)."""
    from ditdeploy.errors import DitDeployError
    from ditdeploy.proof import reference_check
    from ditdeploy.run.deployment import load_reference

    if golden is not None:
        g = reference_check.load_golden(golden)
        g.meta["reference"] = f"golden {golden.name} ({g.meta.get('reference', '?')})"
        return g, None
    if dep is None and reference is None:
        raise DitDeployError("--save-golden without --engine needs --reference CHECKPOINT")
    ref_path = dep.reference_checkpoint(reference) if dep is not None else reference
    if not ref_path.exists():
        raise DitDeployError(f"reference checkpoint {ref_path} not found")
    ref = load_reference(ref_path)
    art = dep.denoiser if dep is not None else None
    if art is not None and ref.config != art.config:
        raise DitDeployError(
            f"the reference {ref_path.name} ({ref.config.variant}) is not the artifact's model "
            f"({art.config.variant}): configs differ; pass the right --reference")
    decoder = dep.optional_decoder() if dep is not None else _vae_alone(vae)
    typer.echo(f"reference: {ref.name} from {ref_path}", err=True)
    g = reference_check.make_golden(ref, ref.config, decoder=decoder, reference_name=f"{ref.name} {ref_path.name}",
                             extra_meta={"reference_path": str(ref_path)}, **settings)
    if save_golden is not None:
        reference_check.save_golden(save_golden, g)
        typer.echo(f"golden file written: {save_golden} ({g.probe_t.shape[0]} timesteps x "
                   f"{g.probe_t.shape[1]} rows, {g.noise.shape[0]} end-to-end samples)")
    return g, ref_path


def _compare(dep, g, precision: str | None, overrides: dict, json_out: Path | None, run: dict,
             fid: dict | None = None) -> None:
    """Run the artifact against the golden outputs, print the report, exit 1 (NumericsError) on failure."""
    from ditdeploy.artifact.files import write_json_atomic
    from ditdeploy.errors import DitDeployError, NumericsError
    from ditdeploy.proof import reference_check

    art, engine = dep.denoiser, dep.path
    if g.config != art.config:
        raise DitDeployError(f"the golden file was made for {g.config.variant} {g.config.input_size}px latents, "
                             f"the artifact is {art.config.variant} {art.config.input_size}: configs differ")
    decoder = dep.optional_decoder()
    prec = precision or reference_check.effective_precision(art)
    th = reference_check.thresholds_for(prec).replace(**overrides)
    rep = reference_check.check(art, g, thresholds=th, precision=prec, backend=art.name, artifact=str(engine),
                         decoder=decoder, **run)
    typer.echo(reference_check.format_report(rep))
    if fid is not None:
        from ditdeploy.fid.delta import format_delta

        typer.echo(format_delta(fid))
    if json_out is not None:
        write_json_atomic(json_out, {**rep.to_dict(), **({"fid": fid} if fid is not None else {})})
    if not rep.passed:
        from ditdeploy.system.cpu_isa import detect

        more = f" (+{len(rep.failures) - 1} more)" if len(rep.failures) > 1 else ""
        raise NumericsError(f"check failed for {engine.name} on {art.name}: {rep.failures[0]}{more} "
                            f"[CPU {detect().label()}]")


def _fid_delta(dep, ref_path: Path, fid_ref: str, samples: int, inception: Path | None, vae: Path | None,
               settings: dict) -> dict:
    """--fid-ref: the artifact's and the torch reference's FID on the same seeds (``ditdeploy.fid.delta``)."""
    from ditdeploy.fid.delta import FidDeltaRequest, fid_delta

    return fid_delta(FidDeltaRequest(artifact=dep.path, reference=ref_path, fid_ref=fid_ref, backend=dep.backend,
                                     options=dep.options, samples=samples, vae=vae,
                                     inception=inception, **settings))


def _fid_ref_path(fid_ref: str | None) -> Path | None:
    """The file ``--fid-ref`` reads (None for the built-in digits reference)."""
    if fid_ref is None:
        return None
    from ditdeploy.fid import DIGITS_REF

    return None if fid_ref == DIGITS_REF else Path(fid_ref)


def _run_trt_lint(path: Path, json_out: Path | None) -> None:
    from ditdeploy.artifact.files import write_json_atomic
    from ditdeploy.artifact.output_policy import check_outputs
    from ditdeploy.export.trt_lint import lint_onnx, require_lint_pass

    check_outputs({"--trt-lint": path}, {"--json": json_out})  # the report never replaces the linted model
    rep = lint_onnx(path)
    typer.echo(rep.format())
    if json_out is not None:
        write_json_atomic(json_out, rep.to_dict())
    require_lint_pass(rep)


def _vae_alone(vae: Path | None):
    """``--save-golden --reference CKPT --vae DEC`` (no artifact): the decoder given, if any."""
    from ditdeploy.runtimes import load_decoder

    return load_decoder(vae) if vae is not None else None
