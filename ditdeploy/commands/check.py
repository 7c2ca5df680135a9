"""`ditdeploy check`: prove an exported artifact computes what the PyTorch reference computes.

The comparison itself lives in ``ditdeploy.checking``; this module only wires the CLI (typer + stdlib at import).
"""

from __future__ import annotations

from pathlib import Path

import typer

SAMPLERS = ("ddim", "ddpm", "dpm-solver++")


def register(app: typer.Typer) -> None:
    @app.command("check")
    def check(
        engine: Path = typer.Option(None, "--engine", "-e", help="Artifact to check (.onnx, .xml, .plan, .pt2)."),
        backend: str = typer.Option(None, "--backend", "-b",
                                    help="Runtime for the artifact (onnxruntime, openvino, tensorrt, aoti); default by "
                                         "suffix."),
        reference: Path = typer.Option(
            None, "--reference", "-r",
            help="PyTorch checkpoint (.safetensors/.pt) of the same model. Default: the checkpoint named in the "
                 "artifact's manifest, or the shipped digits weights for the digits model."),
        golden: Path = typer.Option(None, "--golden",
                                    help="Compare against a golden file instead of torch (no torch needed)."),
        save_golden: Path = typer.Option(None, "--save-golden",
                                         help="Write the reference's inputs and outputs to this .npz (needs torch)."),
        vae: Path = typer.Option(None, "--vae", help="VAE decoder artifact for image metrics (default: manifest's)."),
        sampler: str = typer.Option("ddim", "--sampler", help=f"End-to-end sampler: {', '.join(SAMPLERS)}."),
        steps: int = typer.Option(25, "--steps", help="End-to-end sampling steps."),
        cfg_scale: float = typer.Option(4.0, "--cfg-scale", help="Classifier-free guidance scale (end to end)."),
        batch: int = typer.Option(4, "--batch", help="Images in the end-to-end run (probes use 2x: both CFG halves)."),
        timesteps: int = typer.Option(8, "--timesteps", help="Per-call probes at this many timesteps over 0..999."),
        seed: int = typer.Option(0, "--seed", help="Seed of noise, labels and stochastic samplers."),
        precision: str = typer.Option(
            None, "--precision",
            help="Thresholds to apply (fp32, fp16, bf16, int8). Default: what the runtime reports it runs."),
        precision_hint: str = typer.Option(None, "--precision-hint",
                                           help="OpenVINO inference precision hint (f32, bf16, f16)."),
        per_call_only: bool = typer.Option(False, "--per-call-only", help="Skip the end-to-end sampling run."),
        device: str = typer.Option(None, "--device", help="torch/aoti artifact: cpu | cuda."),
        cuda_graph: bool = typer.Option(False, "--cuda-graph", help="CUDA only: run the artifact through CUDA graphs."),
        th_call_rel_l2: float = typer.Option(None, "--threshold-call-rel-l2", help="Override: max per-call rel-L2."),
        th_call_cosine: float = typer.Option(None, "--threshold-call-cosine", help="Override: min per-call cosine."),
        th_latent_rel_l2: float = typer.Option(None, "--threshold-latent-rel-l2",
                                               help="Override: max end-to-end latent rel-L2."),
        th_psnr: float = typer.Option(None, "--threshold-psnr", help="Override: min end-to-end image PSNR (dB)."),
        th_ssim: float = typer.Option(None, "--threshold-ssim", help="Override: min end-to-end image SSIM."),
        json_out: Path = typer.Option(None, "--json", help="Also write the full report as JSON here."),
        cfg_interval: str = typer.Option(None, "--cfg-interval", help="LO,HI: the artifact's end-to-end run guides "
                                         "only at timesteps LO..HI (the reference stays full work)."),
        cache_interval: int = typer.Option(None, "--cache-interval", help="N: the artifact's end-to-end run reuses "
                                           "features (every N-th step full); the reference stays full work."),
        fid_ref: str = typer.Option(None, "--fid-ref", help="Also sample --fid-samples images with the artifact and "
                                    "with the torch reference (same seeds) and report their FID against this "
                                    "reference (an ADM npz, or 'digits') and the delta."),
        fid_samples: int = typer.Option(1000, "--fid-samples", help="Images per --fid-ref run (whole classes)."),
        inception: Path = typer.Option(None, "--inception", help="FID InceptionV3 weights for --fid-ref (see "
                                       "`ditdeploy fid --help`)."),
        trt_lint: Path = typer.Option(None, "--trt-lint", help="Static TensorRT-readiness lint of an ONNX (ops, "
                                      "attributes, Q/DQ rules; no GPU): exit 1 on a violation."),
    ) -> None:
        """Compare an artifact with the PyTorch reference per denoiser call and end to end; exit 1 on failure."""
        from ditdeploy import checking
        from ditdeploy.artifacts import write_json_atomic
        from ditdeploy.errors import DitDeployError, NumericsError

        if trt_lint is not None:
            if engine is not None or save_golden is not None:
                raise DitDeployError("--trt-lint runs alone: drop --engine / --save-golden")
            _run_trt_lint(trt_lint, json_out)
            return
        if golden is not None and save_golden is not None:
            raise DitDeployError("--golden and --save-golden exclude each other: save on a torch machine, check elsewhere")
        if fid_ref is not None and (golden is not None or engine is None):
            raise DitDeployError("--fid-ref samples the artifact and its PyTorch reference: it needs --engine and "
                                 "does not combine with --golden")
        if fid_ref is not None and fid_samples < 2:
            raise DitDeployError(f"--fid-samples must be >= 2, got {fid_samples}")
        if engine is None and save_golden is None:
            raise DitDeployError("nothing to check: pass --engine FILE (or --save-golden FILE with --reference)")
        from ditdeploy.outputs import check_outputs

        check_outputs({"--engine": engine, "--reference": reference, "--golden": golden, "--vae": vae},
                      {"--json": json_out, "--save-golden": save_golden})
        if sampler not in SAMPLERS:
            raise DitDeployError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        for name, v in (("--steps", steps), ("--batch", batch), ("--timesteps", timesteps)):
            if v < 1:
                raise DitDeployError(f"{name} must be >= 1, got {v}")

        from ditdeploy.diffusion import check_cache_interval, parse_cfg_interval

        interval = parse_cfg_interval(cfg_interval)
        check_cache_interval(cache_interval)
        art = _load_artifact(engine, backend, precision_hint, device, cuda_graph) if engine is not None else None
        if art is not None:
            check_cache_interval(cache_interval, art)

        if golden is not None:
            g = checking.load_golden(golden)
            ref_name = f"golden {golden.name} ({g.meta.get('reference', '?')})"
            g.meta["reference"] = ref_name
        else:
            ref_path = _resolve_reference(reference, art, engine)
            ref = _load_reference(ref_path)
            if art is not None and ref.config != art.config:
                raise DitDeployError(
                    f"the reference {ref_path.name} ({ref.config.variant}) is not the artifact's model "
                    f"({art.config.variant}): configs differ; pass the right --reference")
            decoder = _load_decoder(vae, art)
            typer.echo(f"reference: {ref.name} from {ref_path}", err=True)
            g = checking.make_golden(ref, ref.config, method=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                                     batch=batch, n_timesteps=timesteps, decoder=decoder,
                                     reference_name=f"{ref.name} {ref_path.name}",
                                     extra_meta={"reference_path": str(ref_path)})
            if save_golden is not None:
                checking.save_golden(save_golden, g)
                typer.echo(f"golden file written: {save_golden} ({g.probe_t.shape[0]} timesteps x "
                           f"{g.probe_t.shape[1]} rows, {g.noise.shape[0]} end-to-end samples)")
            if art is None:
                return

        assert art is not None
        if g.config != art.config:
            raise DitDeployError(f"the golden file was made for {g.config.variant} {g.config.input_size}px latents, "
                                 f"the artifact is {art.config.variant} {art.config.input_size}: configs differ")
        decoder = _load_decoder(vae, art)
        prec = precision or checking.effective_precision(art)
        th = checking.thresholds_for(prec).replace(
            call_rel_l2=th_call_rel_l2, call_cosine=th_call_cosine, latent_rel_l2=th_latent_rel_l2,
            psnr=th_psnr, ssim=th_ssim)
        rep = checking.check(art, g, thresholds=th, precision=prec, backend=art.name, artifact=str(engine),
                             decoder=decoder, run_e2e=not per_call_only, progress=True, cfg_interval=interval,
                             cache_interval=cache_interval)
        typer.echo(checking.format_report(rep))
        fid = None
        if fid_ref is not None:
            from ditdeploy.fid.delta import format_delta

            fid = _fid_delta(engine, backend, precision_hint, device, cuda_graph, ref_path, fid_ref, fid_samples,
                             inception, vae, sampler, steps, cfg_scale, seed, interval, cache_interval)
            typer.echo(format_delta(fid))
        if json_out is not None:
            write_json_atomic(json_out, {**rep.to_dict(), **({"fid": fid} if fid is not None else {})})
        if not rep.passed:
            more = f" (+{len(rep.failures) - 1} more)" if len(rep.failures) > 1 else ""
            raise NumericsError(f"check failed for {engine.name} on {art.name}: {rep.failures[0]}{more}")


def _fid_delta(engine, backend, precision_hint, device, cuda_graph, ref_path, fid_ref, samples, inception, vae,
               sampler, steps, cfg_scale, seed, interval, cache_interval) -> dict:
    """--fid-ref: the artifact's and the torch reference's FID on the same seeds (``ditdeploy.fid.delta``)."""
    from ditdeploy.fid.delta import FidDeltaRequest, fid_delta
    from ditdeploy.generation import backend_options
    from ditdeploy.runtimes import resolve_backend

    b = resolve_backend(engine, backend)
    opts = backend_options(b, {"device": device, "cuda_graph": cuda_graph})
    if precision_hint is not None:
        opts["precision_hint"] = precision_hint
    return fid_delta(FidDeltaRequest(
        artifact=engine, reference=ref_path, fid_ref=fid_ref, backend=b, options=opts, samples=samples,
        sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
        cfg_interval=list(interval) if interval is not None else None, cache_interval=cache_interval, vae=vae,
        inception=inception))


def _run_trt_lint(path: Path, json_out: Path | None) -> None:
    from ditdeploy.artifacts import write_json_atomic
    from ditdeploy.export.trt_lint import lint_onnx, require_lint_pass

    rep = lint_onnx(path)
    typer.echo(rep.format())
    if json_out is not None:
        write_json_atomic(json_out, rep.to_dict())
    require_lint_pass(rep)


def _load_artifact(engine: Path, backend: str | None, precision_hint: str | None, device: str | None = None,
                   cuda_graph: bool = False):
    from ditdeploy.generation import backend_options
    from ditdeploy.runtimes import load, resolve_backend

    b = resolve_backend(engine, backend)
    opts = backend_options(b, {"device": device, "cuda_graph": cuda_graph, "precision_hint": precision_hint})
    return load(engine, backend=b, **opts)


def _resolve_reference(reference: Path | None, art, engine: Path | None) -> Path:
    """--reference, else the checkpoint the manifest names (beside the artifact or absolute), else shipped digits."""
    from ditdeploy.errors import DitDeployError

    if reference is not None:
        if not reference.exists():
            raise DitDeployError(f"reference checkpoint {reference} not found")
        return reference
    if art is not None:
        from ditdeploy.manifest import Manifest

        found = Manifest.of(art.manifest, engine or art.path).reference_checkpoint(shipped_fallback=True)
        if found is not None:
            return found
        raise DitDeployError(f"no PyTorch reference for {Path(engine or art.path).name} (its manifest names no checkpoint "
                             "that is here): pass --reference CHECKPOINT, "
                             "or --golden FILE written by `ditdeploy check --save-golden` on a machine with torch")
    raise DitDeployError("--save-golden without --engine needs --reference CHECKPOINT")


def _load_reference(path: Path):
    from ditdeploy.checking import has_torch
    from ditdeploy.errors import DitDeployError
    from ditdeploy.runtimes import load

    if not has_torch():
        raise DitDeployError("the PyTorch reference needs torch, which is not installed here: check against a golden "
                             "file instead (`ditdeploy check --save-golden g.npz` on a machine with torch, then "
                             "`--golden g.npz` here)")
    try:
        return load(path, backend="torch")
    except ImportError as e:
        raise DitDeployError(f"the PyTorch reference could not be loaded ({e}): use --golden FILE") from e


def _load_decoder(vae: Path | None, art):
    from ditdeploy.runtimes import load_decoder

    if vae is not None:
        return load_decoder(vae)
    if art is None or art.config.space == "pixel":
        return None
    from ditdeploy.manifest import Manifest

    p = Manifest.of(art.manifest, getattr(art, "path", None)).decoder_path()
    return load_decoder(p) if p is not None else None
