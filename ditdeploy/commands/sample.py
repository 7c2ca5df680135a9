"""`ditdeploy sample`: class-conditional sampling on any backend -> labelled PNG grid and/or ADM-layout npz.

Imports only typer + stdlib at module import; numpy, the sampler and the chosen runtime load inside the command,
and nothing on the path imports torch unless ``--backend torch`` is chosen.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import typer

# DiT's sample.py demo classes (ImageNet ids), used when a model has many classes and no labels are given
IMAGENET_DEMO_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)
DEFAULT_PER_LABEL_SMALL = 6  # images per class for models with few classes (digits: 10 x 6 grid)
DEFAULT_BATCH = 64
DEFAULT_CFG = 4.0
GRID_MAX = 256  # images shown in the PNG grid when sampling many (the npz holds all)


def shipped_assets() -> Path:
    """Folder of the shipped default model (ditdeploy/assets)."""
    return Path(__file__).resolve().parent.parent / "assets"


def default_engine(backend: str | None) -> Path:
    """The shipped default model for ``backend``: digits.onnx (digits.safetensors for torch)."""
    from ditdeploy.errors import ArtifactError

    assets = shipped_assets()
    if backend and backend.lower() in ("torch", "pytorch"):
        p = assets / "digits.safetensors"
    else:
        p = assets / "digits.onnx"
    if not p.exists():
        raise ArtifactError(f"the shipped default model {p} is missing: reinstall ditdeploy or pass --engine FILE")
    return p


def parse_labels(spec: str | None, num_per_label: int | None, num_classes: int) -> tuple[list[int], int | None]:
    """The label of every image, in global index order, and the grid's row length when rows are classes.

    ``--labels a,b`` (each repeated ``--num-per-label`` times, default once), ``--num-per-label K`` alone: every class
    K times; neither: every class ``DEFAULT_PER_LABEL_SMALL`` times for small class counts (<= 100), else DiT's
    demo classes once each.
    """
    from ditdeploy.errors import DitDeployError

    if num_per_label is not None and num_per_label < 1:
        raise DitDeployError(f"--num-per-label must be >= 1, got {num_per_label}")
    if spec:
        try:
            base = [int(v) for v in spec.replace(" ", "").split(",") if v != ""]
        except ValueError as e:
            raise DitDeployError(f"--labels takes comma-separated class ids like 207,360, got {spec!r}") from e
        if not base:
            raise DitDeployError("--labels is empty")
        bad = [v for v in base if not 0 <= v < num_classes]
        if bad:
            raise DitDeployError(f"labels {bad} out of range: this model has classes 0..{num_classes - 1}")
    elif num_per_label is not None or num_classes <= 100:
        base = list(range(num_classes))
        num_per_label = num_per_label or DEFAULT_PER_LABEL_SMALL
    else:
        base = [v for v in IMAGENET_DEMO_LABELS if v < num_classes] or list(range(min(8, num_classes)))
    k = num_per_label or 1
    labels = [v for v in base for _ in range(k)]
    return labels, (k if k > 1 else None)


def _resolve_decoder(den: Any, vae: Path | None, backend: str, opts: dict[str, Any]):
    from ditdeploy.artifacts import safe_member
    from ditdeploy.errors import DitDeployError
    from ditdeploy.runtimes import READS, load_decoder

    if den.config.space == "pixel":
        if vae is not None:
            raise DitDeployError(f"{den.config.variant} is a pixel-space model: --vae does not apply")
        return None
    path = vae
    if path is None:
        name = (den.manifest or {}).get("decoder")
        if name and getattr(den, "path", None) is not None:
            path = safe_member(Path(den.path).parent, name)
    if path is None:
        raise DitDeployError(
            "this latent-space model needs a VAE decoder: pass --vae vae.onnx (export one with `ditdeploy export`), "
            "or record it as 'decoder' in the artifact's manifest"
        )
    if not Path(path).exists():
        raise DitDeployError(f"VAE decoder {path} not found")
    if Path(path).is_dir():  # a diffusers AutoencoderKL folder: the torch reference decoder
        return load_decoder(path, backend="torch", **({"threads": opts["threads"]} if "threads" in opts else {}))
    dec_backend = backend if Path(path).suffix.lower() in READS.get(backend, ()) else None
    dec_opts = {k: v for k, v in opts.items() if k in ("threads", "providers", "precision_hint")}
    if dec_backend is None:
        dec_opts.pop("precision_hint", None)
        if Path(path).suffix.lower() != ".onnx":
            dec_opts.pop("providers", None)
    return load_decoder(path, backend=dec_backend, **dec_opts)


def _fmt_s(s: float) -> str:
    return f"{s:.3f} s" if s < 10 else f"{s:.1f} s"


def run_sample(
    *,
    engine: Path | None = None,
    backend: str | None = None,
    vae: Path | None = None,
    labels: str | None = None,
    num_per_label: int | None = None,
    sampler: str = "ddim",
    steps: int = 50,
    cfg_scale: float | None = None,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int | None = None,
    out: Path | None = Path("samples.png"),
    npz: Path | None = None,
    shards: int = 1,
    threads: int | None = None,
    provider: str | None = None,
    precision_hint: str | None = None,
    guide_all_channels: bool = False,
    progress: bool = True,
    shard: str | None = None,
    image_size: int | None = None,
) -> dict[str, Any]:
    """Do what ``ditdeploy sample`` does; returns a summary dict (paths, counts, timings)."""
    t_start = time.perf_counter()
    import numpy as np

    from ditdeploy import images, sharding
    from ditdeploy.diffusion import METHODS
    from ditdeploy.diffusion import sample as diffusion_sample
    from ditdeploy.errors import DitDeployError
    from ditdeploy.runtimes import Timed, load, resolve_backend

    # ---- validate cheap arguments before loading anything
    if sampler not in METHODS:
        raise DitDeployError(f"unknown sampler {sampler!r}: choose one of {', '.join(METHODS)}")
    if steps <= 0 or steps > 1000:
        raise DitDeployError(f"--steps must be in 1..1000, got {steps}")
    if cfg_scale is not None and (not cfg_scale >= 0 or cfg_scale == float("inf")):
        raise DitDeployError(f"--cfg-scale must be a finite number >= 0 (1 = no guidance), got {cfg_scale}")
    if eta < 0 or (eta != 0 and sampler != "ddim"):
        raise DitDeployError("--eta must be >= 0 and is only used by --sampler ddim")
    if seed < 0:
        raise DitDeployError(f"--seed must be >= 0, got {seed}")
    if batch_size is not None and batch_size < 1:
        raise DitDeployError(f"--batch-size must be >= 1, got {batch_size}")
    if shards < 1:
        raise DitDeployError(f"--shards must be >= 1, got {shards}")
    if threads is not None and threads < 1:
        raise DitDeployError(f"--threads must be >= 1, got {threads}")
    if out is None and npz is None:
        raise DitDeployError("nothing to write: pass --out PNG and/or --npz FILE")

    my_shard: tuple[int, int] | None = sharding.parse_shard(shard) if shard else None
    if my_shard is None and shards == 1:
        my_shard = sharding.dist_env()  # torchrun-style RANK / WORLD_SIZE
    if my_shard is not None and shards > 1:
        raise DitDeployError("--shards spawns its own workers: do not combine it with --shard or torchrun")

    engine = engine if engine is not None else default_engine(backend)
    if not Path(engine).exists():
        raise DitDeployError(f"no such file: {engine}")
    b = resolve_backend(engine, backend)
    opts: dict[str, Any] = {}
    if threads:
        opts["threads"] = threads
    if provider:
        if b != "onnxruntime":
            raise DitDeployError("--provider applies to the onnxruntime backend only")
        opts["providers"] = provider
    if precision_hint is not None:
        if b != "openvino":
            raise DitDeployError("--precision-hint applies to the openvino backend only")
        opts["precision_hint"] = precision_hint
    if image_size is not None:
        if b != "torch":
            raise DitDeployError("--image-size applies to the torch backend (bare .pt checkpoints) only")
        opts["image_size"] = image_size

    # ---- parent of --shards K: spawn workers, merge, draw the grid
    if shards > 1:
        return _run_sharded(locals_for_workers=dict(
            engine=engine, backend=b, vae=vae, labels=labels, num_per_label=num_per_label, sampler=sampler,
            steps=steps, cfg_scale=cfg_scale, eta=eta, seed=seed, batch_size=batch_size, provider=provider,
            precision_hint=precision_hint, guide_all_channels=guide_all_channels, image_size=image_size),
            shards=shards, threads=threads, out=out, npz=npz, t_start=t_start)

    t0 = time.perf_counter()
    den = load(engine, backend=b, **opts)
    cfg = den.config
    decoder = _resolve_decoder(den, vae, b, opts)
    t_load = time.perf_counter() - t0

    if cfg_scale is None:  # DiT's sample.py default, when the model has a null class to guide against
        cfg_scale = DEFAULT_CFG if cfg.class_dropout_prob > 0 else 1.0
    all_labels, row_len = parse_labels(labels, num_per_label, cfg.num_classes)
    n_total = len(all_labels)
    start, stop = sharding.shard_range(n_total, *my_shard) if my_shard else (0, n_total)
    idx = np.arange(start, stop, dtype=np.int64)
    lab = np.asarray(all_labels, dtype=np.int64)[start:stop]
    bs = batch_size or min(DEFAULT_BATCH, max(1, len(idx)))
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)

    timed = Timed(den)
    timed_dec = Timed(decoder) if decoder is not None else None
    u8_parts = []
    t_sampling = 0.0
    nb = (len(idx) + bs - 1) // bs
    for bi, i in enumerate(range(0, len(idx), bs)):
        bidx, blab = idx[i : i + bs], lab[i : i + bs]
        noise = sharding.initial_noise(seed, bidx, shape)
        t1 = time.perf_counter()
        x0 = diffusion_sample(
            timed, noise, blab, method=sampler, steps=steps, cfg_scale=cfg_scale, eta=eta,
            num_classes=cfg.num_classes, guide_all_channels=guide_all_channels,
            noise_fn=sharding.PerImageNoise(seed, bidx), progress=progress,
        )
        t_sampling += time.perf_counter() - t1
        if progress and nb > 1:
            print(f"batch {bi + 1}/{nb} done", file=sys.stderr)
        imgs = timed_dec(x0) if timed_dec is not None else x0
        u8_parts.append(images.to_uint8(imgs))
    u8 = np.concatenate(u8_parts) if u8_parts else np.zeros((0, 1, 1, 1), np.uint8)

    t2 = time.perf_counter()
    written: list[str] = []
    if my_shard is not None:
        final_npz = npz
        if final_npz is None:
            raise DitDeployError("a sharded run (--shard / torchrun) needs --npz FILE for its part")
        part = sharding.part_path(final_npz, *my_shard)
        images.save_npz(part, u8, lab, index=idx)
        written.append(str(part))
        rank, world = my_shard
        if shard is None and rank == 0:  # torchrun rank 0 merges once every part exists
            parts = [sharding.part_path(final_npz, r, world) for r in range(world)]
            sharding.wait_for_parts(parts)
            sharding.merge_parts(final_npz, parts, n_total)
            written.append(str(final_npz))
            if out is not None:
                _write_grid_from_npz(final_npz, out, row_len)
                written.append(str(out))
    else:
        if npz is not None:
            images.save_npz(npz, u8, lab)
            written.append(str(npz))
        if out is not None:
            m = min(len(u8), GRID_MAX)
            images.save_png(images.grid(u8[:m], lab[:m], cols=row_len), out)
            written.append(str(out) + (f" (first {m} images)" if m < len(u8) else ""))
    t_write = time.perf_counter() - t2

    total = time.perf_counter() - t_start
    overhead = max(0.0, t_sampling - timed.seconds)
    summary = {
        "backend": den.name, "images": int(len(idx)), "written": written, "total_s": total, "load_s": t_load,
        "denoiser_s": timed.seconds, "denoiser_calls": timed.calls, "sampler_overhead_s": overhead,
        "decode_s": timed_dec.seconds if timed_dec else 0.0, "write_s": t_write,
        "decoder": decoder.name if decoder is not None else None,
    }
    typer.echo(
        f"sampled {len(idx)} image(s) with {den.name} ({sampler}, {steps} steps, cfg {cfg_scale:g}, seed {seed}"
        + (f", shard {my_shard[0]}/{my_shard[1]}" if my_shard else "") + f") -> {', '.join(written)}",
        err=True,
    )
    typer.echo(
        f"timing: total {_fmt_s(total)} | load {_fmt_s(t_load)} | denoiser {_fmt_s(timed.seconds)} "
        f"({timed.calls} calls) | sampler overhead {_fmt_s(overhead)} ({100 * overhead / max(total, 1e-9):.2f}%) | "
        f"decode {_fmt_s(summary['decode_s'])} | write {_fmt_s(t_write)}",
        err=True,
    )
    return summary


def _write_grid_from_npz(npz: Path, out: Path, row_len: int | None) -> None:
    import numpy as np

    from ditdeploy import images

    with np.load(npz, mmap_mode=None) as z:
        n = min(len(z["labels"]), GRID_MAX)
        lab = z["labels"][:n]
        arr = z["arr_0"][:n] if n == len(z["labels"]) else np.asarray(z["arr_0"][:n])
    images.save_png(images.grid(arr, lab, cols=row_len), out)


def _run_sharded(*, locals_for_workers: dict[str, Any], shards: int, threads: int | None, out: Path | None,
                 npz: Path | None, t_start: float) -> dict[str, Any]:
    import tempfile

    from ditdeploy import sharding
    from ditdeploy.errors import DitDeployError
    from ditdeploy.runtimes.base import physical_cores

    a = locals_for_workers
    final_npz = npz
    tmpdir = None
    if final_npz is None:
        base = (out.parent if out is not None else Path.cwd())
        base.mkdir(parents=True, exist_ok=True)
        tmpdir = tempfile.mkdtemp(prefix=".ditdeploy-shards-", dir=base)
        final_npz = Path(tmpdir) / "samples.npz"
    argv = ["--engine", str(a["engine"]), "--backend", a["backend"], "--sampler", a["sampler"],
            "--steps", str(a["steps"]), "--eta", repr(float(a["eta"])), "--seed", str(a["seed"]),
            "--npz", str(final_npz), "--no-out"]
    for flag, key in (("--cfg-scale", "cfg_scale"), ("--vae", "vae"), ("--labels", "labels"),
                      ("--num-per-label", "num_per_label"),
                      ("--batch-size", "batch_size"), ("--provider", "provider"),
                      ("--precision-hint", "precision_hint"), ("--image-size", "image_size")):
        if a[key] is not None:
            argv += [flag, str(a[key])]
    if a["guide_all_channels"]:
        argv.append("--guide-all-channels")
    each = max(1, (threads or physical_cores()) // shards)
    parts = [sharding.part_path(final_npz, i, shards) for i in range(shards)]
    try:
        typer.echo(f"running {shards} shard processes ({each} thread(s) each)…", err=True)
        t0 = time.perf_counter()
        sharding.run_workers(argv, shards, each)
        t_workers = time.perf_counter() - t0
        n, img_shape = sharding.merge_parts(final_npz, parts)
        written = [str(final_npz)] if npz is not None else []
        if out is not None:
            import numpy as np

            with np.load(final_npz) as z:
                labels = z["labels"]
            row_len = _row_len(labels)
            _write_grid_from_npz(final_npz, out, row_len)
            written.append(str(out))
    finally:
        for p in parts:
            p.unlink(missing_ok=True)
        if tmpdir is not None:
            import shutil

            shutil.rmtree(tmpdir, ignore_errors=True)
    if n == 0:
        raise DitDeployError("no images were sampled")
    total = time.perf_counter() - t_start
    typer.echo(f"sampled {n} image(s) in {shards} shards -> {', '.join(written)}", err=True)
    typer.echo(f"timing: total {_fmt_s(total)} | shard processes {_fmt_s(t_workers)} | "
               f"merge+grid {_fmt_s(total - t_workers)}", err=True)
    return {"images": n, "written": written, "total_s": total, "shards": shards, "image_shape": img_shape}


def _row_len(labels) -> int | None:
    """Length of the leading run of equal labels when the labels are equal-length runs (rows = classes)."""
    n = len(labels)
    if n < 2:
        return None
    k = 1
    while k < n and labels[k] == labels[0]:
        k += 1
    if k == 1 or n % k:
        return None
    runs = labels.reshape(-1, k)
    return k if bool((runs == runs[:, :1]).all()) else None


def register(app: typer.Typer) -> None:
    @app.command("sample")
    def sample(
        engine: Path = typer.Option(None, "--engine", "-e", help="Denoiser artifact (.onnx, .xml, .plan/.engine, "
                                    ".safetensors/.pt). Default: the shipped digits model."),
        backend: str = typer.Option(None, "--backend", "-b", help="onnxruntime | openvino | tensorrt | torch "
                                    "(default: from the file suffix)."),
        vae: Path = typer.Option(None, "--vae", help="VAE decoder artifact for latent models (default: the "
                                 "manifest's 'decoder')."),
        labels: str = typer.Option(None, "--labels", help="Comma-separated class ids, e.g. 207,360."),
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
        out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="Labelled PNG grid."),
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
        progress: bool = typer.Option(True, "--progress/--no-progress", help="tqdm bar over sampling steps."),
        shard: str = typer.Option(None, "--shard", hidden=True, help="INDEX/COUNT: sample only this shard."),
    ) -> None:
        """Sample class-conditional images on any backend; writes a labelled PNG grid and/or an npz.

        With no arguments: the shipped digits model on ONNX Runtime CPU, all 10 classes -> samples.png.
        """
        run_sample(
            engine=engine, backend=backend, vae=vae, labels=labels, num_per_label=num_per_label, sampler=sampler,
            steps=steps, cfg_scale=cfg_scale, eta=eta, seed=seed, batch_size=batch_size,
            out=None if no_out else out, npz=npz, shards=shards, threads=threads, provider=provider,
            precision_hint=precision_hint, guide_all_channels=guide_all_channels, progress=progress and
            os.environ.get("DITDEPLOY_NO_PROGRESS") != "1", shard=shard, image_size=image_size,
        )
