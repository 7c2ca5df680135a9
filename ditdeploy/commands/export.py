"""`ditdeploy export`: a DiT checkpoint -> verified ONNX / OpenVINO / TensorRT / AOTInductor (.pt2).

The checkpoint may also be the shipped digits model. Imports only typer + stdlib at module import; torch and
the exporters load inside the command.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from ditdeploy.commands import _common as c
from ditdeploy.config.variants import CONDITIONINGS

_EPILOG = (
    "Examples: ditdeploy export --model digits | "
    "ditdeploy export --model XL/2 --checkpoint DiT-XL-2-256x256.pt --precision fp16 | "
    "ditdeploy export --model S/2 --random-weights --fmt openvino | "
    "ditdeploy export --vae ./sd-vae-ft-ema --out vae_decoder.onnx | "
    "ditdeploy export --model digits --fmt aoti --out digits.pt2 | "
    "ditdeploy export --checkpoint DiT-XL-2-256/ --out xl2.onnx (a diffusers snapshot: its vae/ is exported too) | "
    "ditdeploy export --model digits --fmt diffusers --out digits-diffusers/ | "
    "ditdeploy export --model digits --fmt triton --out repo/ (a Triton model repository; docs/serving.md)"
)


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"  # aoti
    int8 = "int8"
    fp8 = "fp8"  # aoti
    int8_dynamic = "int8-dynamic"  # deprecated: --precision int8 --int8-mode dynamic


class Int8Mode(str, Enum):
    static = "static"
    dynamic = "dynamic"


class Int8Activations(str, Enum):
    auto = "auto"
    int8 = "int8"
    uint8 = "uint8"


class Int8Target(str, Enum):
    auto = "auto"
    cpu_vnni = "cpu-vnni"
    cpu_avx2 = "cpu-avx2"
    trt = "trt"


Conditioning = Enum("Conditioning", {k: k for k in CONDITIONINGS}, type=str)


def register(app: typer.Typer) -> None:
    @app.command("export", epilog=_EPILOG)
    def export(
        model: str = typer.Option(None, "--model", "-m", help="Variant S/2 .. XL/8, or 'digits' (the shipped "
                                  "model); optional with --checkpoint (the file's config is used)."),
        checkpoint: str = typer.Option(None, "--checkpoint", "-c",
                                       help="Official .pt (e.g. DiT-XL-2-256x256.pt), ditdeploy .safetensors, a "
                                            "local diffusers DiT snapshot folder (e.g. DiT-XL-2-256/), or an fp32 "
                                            "ditdeploy .onnx export to quantize as is (--precision int8)."),
        random_weights: bool = typer.Option(False, "--random-weights",
                                            help="Export untrained random weights (benchmarking only)."),
        download: bool = typer.Option(False, "--download",
                                      help="Fetch the official weights into the cache when they are absent."),
        image_size: int = typer.Option(None, "--image-size", min=8, help="256 or 512 (latent models; default 256)."),
        conditioning: Conditioning = typer.Option(None, "--conditioning",
                                                  help="Block design for --random-weights."),
        fmt: c.Fmt = typer.Option("onnx", "--fmt", "-f", help="aoti: AOTInductor .pt2; diffusers: a DiTPipeline "
                                "snapshot folder; triton: a Triton model repository folder (ONNX denoiser, "
                                "generate loop, VAE decoder)."),
        precision: Precision = typer.Option(Precision.fp32, "--precision", "-p", help="The artifact's precision "
                                            "(bf16, fp8: aoti only; fp8 needs an FP8 GPU + --calibration)."),
        device: str = typer.Option(None, "--device", help="--fmt aoti: cpu (default) | cuda: the device the .pt2 "
                                   "is compiled for (it runs only there)."),
        opset: int = typer.Option(18, "--opset", min=17, help="ONNX opset (>= 17: LayerNormalization as one node)."),
        max_batch: int = typer.Option(None, "--max-batch", min=1, help="Largest batch the artifact is built for "
                                      "(TensorRT profile, .pt2 dynamic batch; recorded in the manifest; --fmt "
                                      "triton: denoiser rows per call, default 64)."),
        instances: int = typer.Option(None, "--instances", min=1, max=256, help="--fmt triton: generate model "
                                      "instances = requests sampled at once (default 8)."),
        batch_max: int = typer.Option(None, "--batch-max", min=1, hidden=True, help="Old spelling of --max-batch."),
        vae: Path = typer.Option(None, "--vae", help="diffusers AutoencoderKL folder: also export its decoder "
                                 "(alone when no --model is given). Default with a snapshot --checkpoint: its vae/."),
        no_vae: bool = typer.Option(False, "--no-vae", help="Do not export the snapshot's vae/ decoder."),
        calibration: Path = typer.Option(None, "--calibration", help="Calibration set (.npz from `ditdeploy "
                                         "calibrate`) for --precision int8."),
        int8_mode: Int8Mode = typer.Option(Int8Mode.static, "--int8-mode", help="static (Q/DQ, calibrated) | "
                                           "dynamic (ORT CPU)."),
        int8_target: Int8Target = typer.Option(Int8Target.auto, "--int8-target", help="The machine the INT8 "
                                               "artifact runs on: auto (this CPU's ISA) | cpu-vnni (full-range int8 "
                                               "weights) | cpu-avx2 (x86 without VNNI: 7-bit weights, no int16 "
                                               "saturation) | trt (TensorRT Q/DQ; the default for --fmt trt)."),
        int8_activations: Int8Activations = typer.Option(
            Int8Activations.auto, "--activations", help="INT8 (static) activations: auto (uint8 for the cpu-avx2 "
            "target, else int8) | int8 (symmetric Q/DQ, TensorRT-ready) | uint8 (asymmetric, with ONNX Runtime's "
            "CPU fusions; CPU runtimes: docs/export.md 'INT8 forms by CPU' has the speeds)."),
        exclude: str = typer.Option(None, "--exclude", help="INT8: comma-separated roles kept in float (embedder, "
                                    "adaln, final, attention, linear, other), 'default', 'none', or node/module "
                                    "globs such as 'blocks.27.*' (default: embedder,adaln,final,attention)."),
        min_batch: int = typer.Option(None, "--min-batch", min=1, help="TensorRT profile / .pt2: smallest batch (default 1)."),
        opt_batch: int = typer.Option(None, "--opt-batch", min=1, help="TensorRT profile: batch tuned for (default 8)."),
        timing_cache: Path = typer.Option(None, "--timing-cache", help="TensorRT timing cache file (read if "
                                          "present, written after the build)."),
        opt_level: int = typer.Option(3, "--opt-level", min=0, max=5, help="TensorRT builder optimisation level."),
        dry_run: bool = typer.Option(False, "--dry-run", help="--fmt trt: write the build plan "
                                     "(<out>.buildplan.json) instead of building; needs no TensorRT."),
        no_verify: bool = typer.Option(False, "--no-verify", help="Skip the ORT-vs-torch parity check (not "
                                       "recommended; the manifest records verified: false)."),
        seed: int = typer.Option(0, "--seed", min=0, help="Seed of --random-weights and of the verification inputs."),
        out: Path = typer.Option(None, "--out", "-o", help="Output file (default: named after variant, resolution "
                                 "and precision, in the current directory)."),
        cache_graphs: bool = typer.Option(False, "--cache-graphs", help="Two-graph artifact for feature reuse "
                                          "(`sample --cache-interval N`): OUT (full graph + cache output) and "
                                          "OUT's .light graph; fp32 onnx/openvino or int8 onnx; verified."),
        progress: bool = c.progress_option(),
    ) -> None:
        """Export a DiT (and optionally its VAE decoder) to a verified ONNX, OpenVINO or TensorRT artifact."""
        from ditdeploy.artifact.output_policy import check_outputs
        from ditdeploy.errors import DitDeployError

        fmt_, prec, int8_mode, conditioning = c.value(fmt), c.value(precision), c.value(int8_mode), \
            c.value(conditioning)
        int8_target, int8_acts = c.value(int8_target), c.value(int8_activations)
        if prec == "int8-dynamic":
            c.warn_deprecated("--precision int8-dynamic", "--precision int8 --int8-mode dynamic")
            prec, int8_mode = "int8", "dynamic"
        batch_max = c.deprecated("--batch-max", "--max-batch", batch_max, max_batch)
        from ditdeploy.system.bounds import check_batch

        for flag, n in (("--min-batch", min_batch), ("--opt-batch", opt_batch), ("--max-batch", batch_max)):
            check_batch(n, flag)  # before the model is built or exported
        show_progress = c.progress_on(progress)
        fmt_ = _check_combination(fmt_, prec, int8_mode, device, calibration, vae, dry_run, cache_graphs,
                                  model is not None or checkpoint is not None, no_verify, instances)
        int8_target = _int8_target(fmt_, prec, int8_mode, int8_target, int8_acts)
        if prec == "int8":
            from ditdeploy.system.cpu_isa import resolve_activations, resolve_int8_target

            int8_acts = resolve_activations(int8_acts, resolve_int8_target(int8_target), int8_mode, fmt_)
        verify = not no_verify
        if fmt_ == "diffusers" and out is not None:  # a new folder: refused before the model is built
            from ditdeploy.artifact.output_policy import check_new_folder

            check_new_folder("--out", out, {"--checkpoint": checkpoint, "--vae": vae})
        from ditdeploy.artifact.formats import get_format
        from ditdeploy.export import pipeline

        fmt_options = {"min_batch": min_batch, "opt_batch": opt_batch, "timing_cache": timing_cache,  # by format
                       "opt_level": opt_level, "dry_run": dry_run, "device": (device or "cpu").lower(),
                       "calibration": calibration, "instances": instances}

        def say(s: str) -> None:
            typer.echo(s, err=True)

        if model is None and checkpoint is None:  # decoder only
            _export_decoder_only(vae, out, fmt_, opset, verify, (image_size or 256) // 8, show_progress)
            return
        if checkpoint is not None and Path(checkpoint).suffix.lower() == ".onnx":  # quantize an fp32 export as is
            _quantize_export(Path(checkpoint), out, fmt_, prec, cache_graphs, verify, vae,
                             _int8_args(prec, calibration, int8_mode, exclude, show_progress, int8_target, int8_acts))
            return

        net, source = pipeline.load_denoiser_model(
            model, checkpoint, random_weights=random_weights, image_size=image_size, conditioning=conditioning,
            seed=seed, download=download, say=say,
        )
        if prec in ("int8", "fp8") and calibration is not None:  # fail before the slow export, not after it
            from ditdeploy.calibration.capture import check_for_model, load_calibration

            check_for_model(load_calibration(calibration), net.config)
        if source["kind"] == "random":
            say(f"note: exporting RANDOM weights for {model} (benchmarking only; samples will be noise)")
        if prec == "int8" and fmt_ in ("onnx", "openvino"):
            say("note: INT8 from a fresh fp32 export; to quantize the fp32 .onnx you already have (the one calibrate "
                "ran) without exporting again: --checkpoint THAT.onnx")
        snapshot_vae, id2label = source.pop("vae", None), pipeline.class_names(net, source)
        source.pop("id2label", None)
        if vae is None and snapshot_vae and not no_vae and net.config.space == "latent":
            vae = Path(snapshot_vae)
        if fmt_ == "diffusers":
            _write_diffusers(net, out, None if no_vae else vae, id2label, verify, seed, source)
            return
        if fmt_ == "triton":
            _write_triton(net, out, prec, vae, max_batch, instances, opset, verify, seed, source, id2label,
                          show_progress, calibration, int8_mode, exclude)
            return
        target = out or pipeline.default_out(net.config, prec, fmt_)
        decoder_name = dec_out = None
        if vae is not None:
            if net.config.space == "pixel":
                raise DitDeployError(f"{model} is a pixel-space model: it has no VAE decoder (drop --vae)")
            dec_fmt = get_format(fmt_).decoder or "onnx"
            dec_out = target.with_name(pipeline.DECODER_NAME + get_format(dec_fmt).suffix)
        n_bytes = sum(int(p.numel()) for p in net.parameters()) * {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1,
                                                                   "fp8": 1}[prec]
        check_outputs({"--checkpoint": checkpoint, "--vae": vae, "--calibration": calibration,
                       "--timing-cache": timing_cache},
                      {"--out": target.with_name(target.stem + ".buildplan.json")} if dry_run else {},
                      None if dry_run else {"--out": n_bytes},
                      sets={} if dry_run else {"--out": target, "--vae decoder": dec_out,
                                               "--cache-graphs light graph": _light(target) if cache_graphs else None})
        if vae is not None:
            dm = pipeline.export_decoder(str(vae), dec_out, dec_fmt, opset=opset, verify=verify,
                                         latent_size=net.config.input_size, progress=show_progress)
            _summary(dec_out, dm)
            decoder_name = dec_out.name
        if cache_graphs:
            m = pipeline.export_cache_pair(net, target, fmt_, opset=opset, verify=verify, source=source,
                                           decoder=decoder_name, seed=seed,
                                           int8=_int8_args(prec, calibration, int8_mode, exclude, show_progress,
                                                           int8_target, int8_acts))
            _summary(target, m)
            return
        with pipeline.removed_on_failure(dec_out if decoder_name else None):
            m = pipeline.export_denoiser(
                net, target, fmt_, prec, opset=opset, verify=verify, batch_max=batch_max, source=source,
                decoder=decoder_name, calibration=str(calibration) if calibration else None, int8_mode=int8_mode,
                seed=seed, progress=show_progress,
                int8_options={"target": int8_target, "activations": int8_acts,
                              **({"exclude": [e.strip() for e in exclude.split(",")]} if exclude else {})}
                if prec == "int8" else None,
                id2label=id2label,
                options={k: v for k, v in fmt_options.items() if k in get_format(fmt_).options},
            )
        if fmt_ == "trt" and dry_run:
            lint = m.get("trt_lint") or {}
            typer.echo(f"wrote TensorRT build plan {m.get('written_to')} (dry run: no engine built; TensorRT lint "
                       f"passed on {lint.get('nodes', '?')} nodes)")
            return
        _summary(target, m)


def _check_combination(fmt: str, prec: str, int8_mode: str, device: str | None, calibration: Path | None,
                       vae: Path | None, dry_run: bool, cache_graphs: bool, has_model: bool, no_verify: bool,
                       instances: int | None = None) -> str:
    """Refuse flag combinations that cannot work, before anything slow (warn loudly about --no-verify); returns
    the format's name (an alias such as tensorrt -> trt)."""
    from ditdeploy.artifact.formats import FORMATS, get_format
    from ditdeploy.errors import DitDeployError

    spec = get_format(fmt)
    fmt = spec.name

    def takers(option: str) -> str:
        return "|".join(s.name for s in FORMATS.values() if option in s.options)

    if prec not in spec.precisions:
        elsewhere = "|".join(s.name for s in FORMATS.values() if prec in s.precisions)
        raise DitDeployError(f"--precision {prec}: --fmt {fmt} builds {', '.join(spec.precisions)}"
                             + (f" ({prec}: --fmt {elsewhere})" if elsewhere else ""))
    for option, given in (("dry_run", dry_run), ("device", device is not None), ("instances", instances is not None)):
        if given and option not in spec.options:
            raise DitDeployError(f"--{option.replace('_', '-')} applies to --fmt {takers(option)} only")
    if fmt == "aoti":  # device and precision checked before the model is loaded (fp8: an FP8 GPU)
        _check_aoti(device, prec, calibration, vae)
    if cache_graphs and (fmt not in ("onnx", "openvino") or prec not in ("fp32", "int8")
                         or (prec == "int8" and fmt != "onnx")):
        raise DitDeployError("--cache-graphs exports fp32 ONNX or OpenVINO, or an INT8 ONNX pair (--fmt onnx "
                             "--precision int8; OpenVINO runs it with --backend openvino)")
    if fmt == "triton" and not has_model:
        raise DitDeployError("--fmt triton packages a denoiser: pass --model or --checkpoint (and --vae for a "
                             "latent model)")
    if cache_graphs and not has_model:
        raise DitDeployError("--cache-graphs needs a denoiser: pass --model or --checkpoint")
    if not has_model and vae is None:
        raise DitDeployError("nothing to export: pass --model VARIANT|digits or --checkpoint FILE "
                             "(and/or --vae DIR)")
    if prec == "int8" and int8_mode == "static" and calibration is None:
        raise DitDeployError("--precision int8 needs --calibration FILE.npz (from `ditdeploy calibrate`), "
                             "or --int8-mode dynamic for ONNX Runtime CPU")
    if no_verify:
        import warnings

        typer.secho("warning: --no-verify: the exported graph is NOT checked against torch "
                    "(manifest records verified: false)", fg="yellow", err=True)
        warnings.filterwarnings("ignore", message=r".*verification skipped \(--no-verify\)")  # said once, above
    if fmt == "trt" and prec == "int8" and int8_mode != "static":
        raise DitDeployError("TensorRT needs the static Q/DQ INT8 (--int8-mode static --calibration ...)")
    if fmt == "trt" and not dry_run:  # fail before the slow ONNX export, not after it
        from ditdeploy.export.tensorrt import import_tensorrt

        import_tensorrt()
    return fmt


def _int8_target(fmt: str, prec: str, int8_mode: str, target: str, activations: str = "auto") -> str:
    """The INT8 target: ``trt`` for --fmt trt, else the one asked for (auto: this CPU's); mismatches refused."""
    from ditdeploy.errors import DitDeployError

    if prec != "int8":
        if target != "auto" or activations != "auto":
            raise DitDeployError(f"{'--int8-target' if target != 'auto' else '--activations'} applies to --precision "
                                 "int8")
        return target
    if activations == "uint8" and (fmt == "trt" or target == "trt" or int8_mode != "static"):
        raise DitDeployError("--activations uint8 is the static CPU form: TensorRT needs int8 activations, and "
                             "dynamic INT8 always quantizes activations to uint8 at run time")
    if activations == "uint8" and fmt != "onnx":
        raise DitDeployError("--activations uint8 writes ONNX (--fmt onnx) with ONNX Runtime's fused CPU ops; "
                             "OpenVINO runs the int8-activation form")
    if fmt == "trt":
        if target not in ("auto", "trt"):
            raise DitDeployError(f"--fmt trt builds the TensorRT INT8 form: drop --int8-target {target} (or use "
                                 "--fmt onnx|openvino for a CPU form)")
        return "trt"
    if target == "trt" and int8_mode != "static":
        raise DitDeployError("--int8-target trt is the static Q/DQ form: use --int8-mode static --calibration ...")
    return target


def _export_decoder_only(vae: Path, out: Path | None, fmt: str, opset: int, verify: bool, latent_size: int,
                         progress: bool) -> None:
    """``export --vae DIR`` without a denoiser: the VAE decoder alone."""
    from ditdeploy.artifact.formats import get_format
    from ditdeploy.artifact.output_policy import check_outputs
    from ditdeploy.errors import DitDeployError
    from ditdeploy.export import pipeline

    if fmt == "diffusers":
        raise DitDeployError("--fmt diffusers writes a DiT pipeline: pass --model or --checkpoint")
    if get_format(fmt).decoder != fmt:
        raise DitDeployError("the VAE decoder exports to onnx or openvino (TensorRT: build from the ONNX)")
    dec_out = out or Path(f"{pipeline.DECODER_NAME}{get_format(fmt).suffix}")
    check_outputs({"--vae": vae}, {}, sets={"--out": dec_out})
    m = pipeline.export_decoder(str(vae), dec_out, fmt, opset=opset, verify=verify, latent_size=latent_size,
                                progress=progress)
    _summary(dec_out, m)


def _write_diffusers(net, out: Path | None, vae: Path | None, id2label, verify: bool, seed: int,
                     source: dict) -> None:
    """``--fmt diffusers``: a DiTPipeline snapshot folder."""
    from ditdeploy.export import pipeline

    target = out or Path(pipeline.slug(net.config) + "-diffusers")
    dm = pipeline.export_denoiser(net, target, "diffusers", "fp32", vae=vae, id2label=id2label, verify=verify,
                                  seed=seed, source=source)
    typer.echo(f"wrote diffusers snapshot {target}/ ({len(dm['files'])} files"
               + (", weights verified bit-exact on reload" if verify else ", NOT verified") + ")")


def _write_triton(net, out: Path | None, prec: str, vae: Path | None, max_batch: int | None,
                  instances: int | None, opset: int, verify: bool, seed: int, source: dict, id2label,
                  progress: bool, calibration: Path | None, int8_mode: str, exclude: str | None) -> None:
    """``--fmt triton``: a Triton model repository folder."""
    from ditdeploy.artifact.output_policy import check_outputs
    from ditdeploy.export import pipeline

    target = out or Path(pipeline.slug(net.config) + "-triton")
    check_outputs({"--vae": vae, "--calibration": calibration}, {})
    m = pipeline.export_denoiser(net, target, "triton", prec, vae=vae, batch_max=max_batch, opset=opset,
                                 verify=verify, seed=seed, source=source, id2label=id2label, progress=progress,
                                 calibration=str(calibration) if calibration else None, int8_mode=int8_mode,
                                 int8_options={"exclude": [e.strip() for e in exclude.split(",")]} if exclude
                                 else None, options={"instances": instances})
    size = sum(f["bytes"] for f in m["files"].values())
    typer.echo(f"wrote Triton model repository {target}/ ({', '.join(m['models'])}; {size / 1e6:.1f} MB, "
               f"{m['precision']}; variants: default onnxruntime, --model-config-name tensorrt|openvino|python)")


def _int8_args(prec: str, calibration: Path | None, int8_mode: str, exclude: str | None, progress: bool,
               target: str, activations: str = "auto") -> dict | None:
    """``quantize_int8`` arguments of an INT8 export (None for other precisions)."""
    if prec != "int8":
        return None
    return {"calibration": str(calibration) if calibration else None, "mode": int8_mode, "progress": progress,
            "target": target, "activations": activations,
            **({"exclude": [e.strip() for e in exclude.split(",")]} if exclude else {})}


def _quantize_export(src: Path, out: Path | None, fmt: str, prec: str, cache_graphs: bool, verify: bool,
                     vae: Path | None, int8: dict | None) -> None:
    """``export --checkpoint FP32.onnx --precision int8``: quantize an existing fp32 export (plain or two-graph)
    without loading torch or exporting again (the graph `calibrate` ran is the graph quantized)."""
    from ditdeploy.artifact.formats import get_format
    from ditdeploy.artifact.output_policy import check_outputs
    from ditdeploy.errors import DitDeployError
    from ditdeploy.export import pipeline

    c.existing(src)
    if prec != "int8" or vae is not None:
        raise DitDeployError("--checkpoint FILE.onnx is an fp32 export to quantize: use it with --precision int8 "
                             "(and without --vae; the decoder the manifest names is kept)")
    target = out or src.with_name(src.stem + "-int8" + get_format(fmt).suffix)
    check_outputs({"--checkpoint": src, "--calibration": int8 and int8["calibration"]}, {},
                  sets={"--out": target, "--cache-graphs light graph": _light(target) if cache_graphs else None})
    m = pipeline.quantize_export(src, target, fmt, cache_graphs=cache_graphs, verify=verify, **(int8 or {}))
    _summary(target, m)


def _light(target: Path) -> Path:
    """The light graph ``--cache-graphs`` writes beside ``target``."""
    from ditdeploy.export.cache_graphs import light_path

    return light_path(target)


def _check_aoti(device: str | None, prec: str, calibration: Path | None, vae: Path | None) -> None:
    """--fmt aoti: device/precision this machine can build (``export.aoti.check_target``), fp8's calibration set."""
    from ditdeploy.errors import DitDeployError
    from ditdeploy.export.aoti import check_target

    check_target((device or "cpu").lower(), prec)
    if prec == "fp8" and calibration is None:
        raise DitDeployError("--precision fp8 needs --calibration FILE.npz (activation scales; `ditdeploy calibrate`)")
    if vae is not None:
        raise DitDeployError("--vae with --fmt aoti: export the VAE decoder separately (--fmt onnx)")


def _summary(path: Path, m: dict) -> None:
    """One line per artifact: path, size, parity, time."""
    from ditdeploy.artifact.manifest import Manifest

    m = Manifest.of(m)
    size = m.total_bytes
    parity = m.section("parity")
    worst = parity.get("worst") or {}
    if worst.get("rel_l2") is not None:
        par = f"rel-L2 {worst['rel_l2']:.2e} vs {parity.get('reference', 'reference')}"
    elif parity:
        par = "parity recorded"
    else:
        par = "NOT verified"
    t = m.get("export_seconds")
    typer.echo(f"wrote {path} ({size / 1e6:.1f} MB, {m.get('precision', '?')}, {par}"
               + (f", {t:.1f} s" if isinstance(t, (int, float)) else "") + ")")
