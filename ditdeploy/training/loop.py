"""The training loop behind ``ditdeploy train``: official DiT recipe, deterministic and resumable.

Per step s (0-based) a generator seeded from ``(seed, s)`` draws the *global* batch's timesteps (uniform 0..999),
noise, label-dropout mask and (for latents) the VAE sampling noise; each rank takes its slice, as it takes its slice
of the global batch of images (see ``data.EpochOrder``). Hence:

- a run resumed from a checkpoint sees exactly the inputs the uninterrupted run saw (bit-identical losses);
- N ranks x (B/N) compute the same per-sample losses as 1 rank x B; DDP's gradient average of the per-rank means
  equals the mean over the global batch (the official semantics).

Label dropout (p = ``config.class_dropout_prob``, label -> null class ``num_classes``) is applied here with that
mask instead of inside the model's train-mode forward, for the same reason; the result is the model's own
token-drop semantics.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditdeploy.errors import DitDeployError, NumericsError
from ditdeploy.training import state as ckstate
from ditdeploy.training.data import EpochOrder
from ditdeploy.training.dist import DistInfo, barrier, cleanup, init_distributed, mean_across
from ditdeploy.training.ema import update_ema
from ditdeploy.training.losses import NUM_TIMESTEPS, training_losses
from ditdeploy.training.presets import preset_defaults

PRECISIONS = ("fp32", "bf16", "fp16")
# Options that define the optimisation itself: a resumed run keeps the checkpoint's values (giving a different
# value is an error). The rest (step count, logging, checkpoint cadence, workers, paths) may change on resume.
SEMANTIC_KEYS = ("preset", "model", "image_size", "hidden_size", "depth", "num_heads", "global_batch", "lr",
                 "weight_decay", "ema_decay", "seed", "precision", "flip", "precompute_latents")


@dataclass
class TrainArgs:
    """Every option of a training run (plain data: stored as a dict in checkpoints)."""

    out: str
    preset: str | None = None
    data: str | None = None
    vae: str | None = None
    model: str = "S/2"
    image_size: int = 256
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    global_batch: int = 256
    steps: int = 400_000
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    seed: int = 0
    precision: str = "fp32"
    grad_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"
    num_workers: int = 4
    flip: bool = True
    precompute_latents: bool = False
    latent_cache: str | None = None
    log_every: int = 100
    ckpt_every: int = 5000
    keep: int = 3
    resume: str | None = None
    export_ema: str | None = None
    threads: int | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_args(given: dict[str, Any]) -> tuple[TrainArgs, dict[str, Any] | None]:
    """Merge explicitly given options (``None`` = not given) over the checkpoint's (on --resume) or the preset's
    defaults. Returns the arguments and the loaded checkpoint (or None)."""
    given = {k: v for k, v in given.items() if v is not None}
    if "out" not in given:
        raise DitDeployError("--out DIR is required: the run folder for checkpoints, metrics and the EMA export")
    ck = None
    if given.get("resume"):
        ck = ckstate.load_checkpoint(ckstate.resolve_resume(given["resume"]))
        base = dict(ck["args"])
        for k in SEMANTIC_KEYS:
            if k in given and given[k] != base.get(k):
                raise DitDeployError(
                    f"--{k.replace('_', '-')} {given[k]} differs from the resumed run's {base.get(k)}: "
                    "a resume continues the same run; drop the option or start a new --out"
                )
        base.update(given)
    else:
        base = preset_defaults(given.get("preset"))
        base.update(given)
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    args = TrainArgs(**{k: v for k, v in base.items() if k in names})
    _validate(args)
    return args, ck


def _validate(a: TrainArgs) -> None:
    if a.preset is None and a.data is None:
        raise DitDeployError("nothing to train on: pass --preset digits or --data DIR (ImageNet layout) --vae DIR")
    if a.preset is not None and a.data is not None:
        raise DitDeployError("--preset and --data are exclusive: the digits preset brings its own data")
    if a.preset == "digits" and str(a.model).lower() != "digits":
        raise DitDeployError(f"--model {a.model}: the digits preset trains the 'digits' model; drop --model "
                             "(resize it with --hidden-size / --depth / --num-heads)")
    if a.preset is None:
        from ditdeploy.config.variants import variant_config

        variant_config(a.model)  # an unknown variant name fails here, before the data and the VAE load
    if a.precision not in PRECISIONS:
        raise DitDeployError(f"unknown --precision {a.precision!r}: choose one of {', '.join(PRECISIONS)}")
    for name in ("steps", "global_batch", "log_every", "ckpt_every", "keep"):
        if getattr(a, name) <= 0:
            raise DitDeployError(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    if not a.lr > 0 or not math.isfinite(a.lr):
        raise DitDeployError(f"--lr must be a positive number, got {a.lr}")
    if a.weight_decay < 0:
        raise DitDeployError(f"--weight-decay must be >= 0, got {a.weight_decay}")
    if not 0.0 <= a.ema_decay < 1.0:
        raise DitDeployError(f"--ema-decay must be in [0, 1), got {a.ema_decay}")
    if a.num_workers < 0:
        raise DitDeployError(f"--num-workers must be >= 0, got {a.num_workers}")
    if a.data is not None and a.vae is None:
        raise DitDeployError("--data needs --vae DIR: a diffusers AutoencoderKL folder (save_pretrained layout)")


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DitDeployError(f"output folder {out} is not writable ({e.strerror or e}): choose another --out") from e


def step_seed(seed: int, step: int) -> int:
    """64-bit seed of the per-step generator, a hash of (seed, step)."""
    s = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), 0xD17]).generate_state(2, dtype=np.uint32)
    return (int(s[0]) << 31) ^ int(s[1])


def step_randomness(seed: int, step: int, global_batch: int, shape: tuple[int, ...], p_drop: float,
                    needs_eps: bool) -> dict[str, torch.Tensor]:
    """The global batch's t, noise, dropout mask (and latent eps) of ``step``; same on every rank."""
    g = torch.Generator().manual_seed(step_seed(seed, step))
    out = {
        "t": torch.randint(0, NUM_TIMESTEPS, (global_batch,), generator=g),
        "noise": torch.randn((global_batch, *shape), generator=g),
        "drop": torch.rand(global_batch, generator=g) < p_drop,
    }
    if needs_eps:
        out["eps"] = torch.randn((global_batch, *shape), generator=g)
    return out


def state_sha256(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (bitwise identity of weights)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.numpy().tobytes() if v.dtype != torch.bfloat16 else v.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def enable_grad_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each transformer block in backward instead of storing its activations (names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    def wrapped(orig, *a):
        if torch.is_grad_enabled():
            return checkpoint(orig, *a, use_reentrant=False)
        return orig(*a)

    for block in model.blocks:
        block.forward = functools.partial(wrapped, block.forward)


# ----------------------------------------------------------------------------------------------------------------
def _build_source(args: TrainArgs, info: DistInfo, out: Path):
    """(source, config) for the run."""
    from ditdeploy.config.variants import variant_config
    from ditdeploy.models import DiTConfig  # noqa: F401  (torch path; keeps import order obvious)

    overrides = {k: getattr(args, k) for k in ("hidden_size", "depth", "num_heads") if getattr(args, k) is not None}
    if args.preset == "digits":
        from ditdeploy.training.data import digits_train
        from ditdeploy.training.sources import PixelSource

        cfg = variant_config("digits", **overrides)
        if overrides:
            cfg = dataclasses.replace(cfg, variant="custom")
        return PixelSource(*digits_train()), cfg

    from ditdeploy.training.data import scan_image_folder
    from ditdeploy.training.latents import (
        LatentCache,
        build_latent_cache,
        load_vae,
        vae_downsample,
        vae_fingerprint,
    )
    from ditdeploy.training.sources import ImageVAESource, LatentCacheSource

    index = scan_image_folder(args.data)
    vae = load_vae(args.vae, info.device)
    down = vae_downsample(vae)
    if args.image_size % down:
        raise DitDeployError(f"--image-size {args.image_size} is not a multiple of the VAE's downsampling {down}")
    cfg = variant_config(args.model, args.image_size, num_classes=len(index.classes),
                         in_channels=vae.config.latent_channels, **overrides)
    cfg = dataclasses.replace(cfg, input_size=args.image_size // down)
    if overrides:
        cfg = dataclasses.replace(cfg, variant="custom")
    if cfg.input_size % cfg.patch_size:
        raise DitDeployError(f"latent size {cfg.input_size} is not divisible by patch size {cfg.patch_size}")
    if not args.precompute_latents:
        return ImageVAESource(index, args.image_size, vae, flip=args.flip), cfg
    cache_dir = Path(args.latent_cache) if args.latent_cache else out / "latents"
    meta = {"data_fingerprint": index.fingerprint(), "vae_fingerprint": vae_fingerprint(args.vae),
            "image_size": args.image_size, "flip": bool(args.flip), "classes": list(index.classes)}
    if info.is_main:
        if not LatentCache.exists(cache_dir):
            build_latent_cache(index, vae, cache_dir, args.image_size, args.flip, meta, device=info.device,
                               progress=args.progress)
    else:  # wait on the file system, not a collective: extraction can outlast a process-group timeout
        while not LatentCache.exists(cache_dir):
            time.sleep(2.0)
    barrier(info)
    cache = LatentCache(cache_dir)
    cache.check_matches(meta)
    return LatentCacheSource(cache), cfg


def _batches(source, order: EpochOrder, start: int, stop: int, num_workers: int, pin: bool):
    from ditdeploy.training.sources import StepBatches

    ds = StepBatches(source, order)
    if num_workers == 0:
        return (ds[s] for s in range(start, stop))
    return iter(torch.utils.data.DataLoader(ds, batch_size=None, sampler=range(start, stop), num_workers=num_workers,
                                            pin_memory=pin, prefetch_factor=4))


def _truncate_metrics(path: Path, upto: int) -> None:
    """Keep the metrics lines of steps <= ``upto`` (a resumed run rewrites the rest); drop partial lines."""
    from ditdeploy.artifact.files import write_bytes_atomic

    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("step", upto + 1) <= upto:
            keep.append(line)
    write_bytes_atomic(path, ("\n".join(keep) + "\n").encode() if keep else b"")


def export_ema(ema: torch.nn.Module, cfg, path: Path, extra: dict[str, Any]) -> Path:
    """EMA weights -> safetensors with the DiTConfig JSON in metadata "config" (via ditdeploy.sources.checkpoints)."""
    from ditdeploy.sources.checkpoints import save_safetensors

    save_safetensors(ema, path, cfg, extra_metadata={k: str(v) for k, v in extra.items()})
    return path


def train(args: TrainArgs, ck: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns a summary (final step, last loss, steps/s, paths). Call under torchrun
    for DDP (WORLD_SIZE > 1)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    info = init_distributed(args.device)
    try:
        return _train(args, info, ck)
    finally:
        cleanup(info)


def _check_out(args: TrainArgs, info: DistInfo, out: Path, ckdir: Path, ck: dict[str, Any] | None) -> None:
    """Device/batch sanity, then (main rank) prepare ``out``: stale temps cleaned, no silent restart over a run."""
    dev = info.device
    if args.precision == "fp16" and dev.type != "cuda":
        raise DitDeployError("--precision fp16 needs a CUDA GPU (GradScaler); on CPU use --precision bf16 or fp32")
    if args.global_batch % info.world_size:
        raise DitDeployError(f"--global-batch {args.global_batch} is not divisible by the {info.world_size} ranks")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if info.is_main:
        _prepare_out(out)
        ckdir.mkdir(exist_ok=True)
        ckstate.remove_stale_temps(ckdir)
        existing = ckstate.list_checkpoints(ckdir)
        if ck is None and existing:
            raise DitDeployError(f"{out} already holds checkpoints of a run: pass --resume {out} to continue it, "
                                 "or choose a new --out")
        newer = [s for s, _ in existing if ck is not None and s > int(ck["step"])]
        if newer:
            raise DitDeployError(f"{ckdir} holds checkpoints newer than the resumed step {ck['step']} "
                                 f"(e.g. {newer[-1]}): move them away first, or resume from the newest")
    barrier(info)


@dataclass
class _Run:
    """What one training run holds: the model, its EMA, optimizer, scaler and the open log window."""

    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    start: int
    win_sums: torch.Tensor  # loss, mse, vb summed since the last log line
    win_n: int


def _build_run(args: TrainArgs, info: DistInfo, cfg, n_items: int, ck: dict[str, Any] | None) -> _Run:
    """Model, EMA, optimizer and scaler, fresh or restored from ``ck`` (seeding order fixed: results depend on it)."""
    from ditdeploy.models import create_model

    dev = info.device
    torch.manual_seed(args.seed)  # the same initial weights on every rank and for any number of ranks
    model = create_model(cfg).to(dev)
    torch.manual_seed(args.seed * info.world_size + info.rank)  # anything not drawn from the per-step generator
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(dev.type, enabled=args.precision == "fp16")
    run = _Run(model, ema, opt, scaler, 0, torch.zeros(3, dtype=torch.float64, device=dev), 0)
    if ck is None:
        update_ema(ema, model, 0.0)
        return run
    if dataclasses.asdict(cfg) != dict(ck["config"]):
        raise DitDeployError("the checkpoint's model config differs from this run's: resume with the same data/model")
    if ck["data"]["num_items"] != n_items:
        raise DitDeployError(f"the resumed run trained on {ck['data']['num_items']} items, the data now has "
                             f"{n_items}: resume on the same data")
    model.load_state_dict(ck["model"])
    ema.load_state_dict(ck["ema"])
    opt.load_state_dict(ck["opt"])
    if "scaler" in ck and ck["scaler"]:
        scaler.load_state_dict(ck["scaler"])
    ckstate.set_rng_state(ck["rng"])
    run.start = int(ck["step"])
    log = ck.get("log") or {}
    run.win_sums = torch.tensor(log.get("sums", [0.0, 0.0, 0.0]), dtype=torch.float64, device=dev)
    run.win_n = int(log.get("count", 0))
    return run


def _model_fn(args: TrainArgs, info: DistInfo, model: torch.nn.Module):
    """The forward used by the loss: DDP- and compile-wrapped as asked, under autocast for bf16/fp16."""
    if args.grad_checkpointing:
        enable_grad_checkpointing(model)
    fwd: torch.nn.Module = model
    dev = info.device
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if args.compile:
        fwd = torch.compile(fwd)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return fwd(x, t, y)

    return model_fn


def _start_metrics(args: TrainArgs, info: DistInfo, out: Path, cfg, ck: dict[str, Any] | None, start: int) -> Path:
    """metrics.jsonl cut back to the resumed step (or removed on a fresh run) and args.json written."""
    from ditdeploy.artifact.files import write_json_atomic

    metrics_path = out / "metrics.jsonl"
    if info.is_main:
        if ck is not None:
            _truncate_metrics(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()
        write_json_atomic(out / "args.json", {"args": args.to_dict(), "config": dataclasses.asdict(cfg),
                                               "world_size": info.world_size, "resumed_from_step": start})
    barrier(info)
    return metrics_path


def _train_step(args: TrainArgs, info: DistInfo, run: _Run, model_fn, source, cfg, step: int, batch,
                lo: int, hi: int, p_drop: float) -> torch.Tensor:
    """One optimisation step on this rank's slice; returns the detached (loss, mse, vb) means."""
    dev = info.device
    payload, y = batch
    r = step_randomness(args.seed, step, args.global_batch, source.sample_shape, p_drop, source.needs_eps)
    t = r["t"][lo:hi].to(dev)
    noise = r["noise"][lo:hi].to(dev)
    y = torch.where(r["drop"][lo:hi], cfg.num_classes, y).to(dev)
    with torch.no_grad():
        x0 = source.to_x0(payload.to(dev, non_blocking=True), r["eps"][lo:hi].to(dev) if source.needs_eps else None)
    losses = training_losses(model_fn, x0, t, y, noise)
    loss = losses["loss"].mean()
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    update_ema(run.ema, run.model, args.ema_decay)
    return torch.stack([loss.detach(), losses["mse"].detach().mean(), losses["vb"].detach().mean()]).double()


def _log_line(args: TrainArgs, info: DistInfo, run: _Run, order: EpochOrder, step: int, win_steps: int,
              t_run0: float, t_win0: float) -> dict[str, Any]:
    """The metrics record of the window that ends at ``step`` (0-based), averaged across ranks."""
    done = step + 1
    avg = mean_across(info, run.win_sums / run.win_n).cpu().tolist()
    now = time.perf_counter()
    sps = win_steps / max(now - t_win0, 1e-9)
    if not all(math.isfinite(v) for v in avg):
        raise NumericsError(f"training loss became {avg[0]} at step {done}: lower --lr or use --precision fp32")
    rec = {"step": done, "epoch": order.epoch_of(step), "loss": avg[0], "mse": avg[1], "vb": avg[2],
           "lr": args.lr, "steps_per_s": sps, "samples_per_s": sps * args.global_batch,
           "elapsed_s": now - t_run0, "time": time.time()}
    if run.scaler.is_enabled():
        rec["grad_scale"] = float(run.scaler.get_scale())
    return rec


def _save(args: TrainArgs, info: DistInfo, run: _Run, cfg, order: EpochOrder, ckdir: Path, done: int) -> Path | None:
    """Checkpoint at ``done`` steps (main rank), with the log window made rank-independent for exact resumes."""
    run.win_sums = mean_across(info, run.win_sums)
    path = None
    if info.is_main:
        path = ckstate.save_checkpoint(ckdir / ckstate.checkpoint_name(done), {
            "model": run.model.state_dict(), "ema": run.ema.state_dict(), "opt": run.opt.state_dict(),
            "scaler": run.scaler.state_dict(), "args": args.to_dict(), "config": dataclasses.asdict(cfg),
            "step": done, "rng": ckstate.rng_state(), "data": order.state(done),
            "log": {"sums": run.win_sums.cpu().tolist(), "count": run.win_n}, "world_size": info.world_size,
            "torch_version": str(torch.__version__),
        })
        ckstate.prune(ckdir, args.keep)
    barrier(info)
    return path


def _loop(args: TrainArgs, info: DistInfo, run: _Run, model_fn, source, cfg, order: EpochOrder, ckdir: Path,
          mf, bar) -> tuple[dict[str, Any], Path | None, float]:
    """Steps ``run.start .. args.steps``: log lines every ``log_every``, checkpoints every ``ckpt_every``."""
    lo, hi = info.rank * order.local_batch, (info.rank + 1) * order.local_batch
    p_drop = float(cfg.class_dropout_prob)
    batches = _batches(source, order, run.start, args.steps, args.num_workers, pin=info.device.type == "cuda")
    t_run0 = t_win0 = time.perf_counter()
    win_steps = 0
    last: dict[str, Any] = {}
    ckpt_path = None
    for step in range(run.start, args.steps):
        run.win_sums += _train_step(args, info, run, model_fn, source, cfg, step, next(batches), lo, hi, p_drop)
        run.win_n += 1
        win_steps += 1
        done = step + 1
        bar.update(1)
        if done % args.log_every == 0 or done == args.steps:
            last = _log_line(args, info, run, order, step, win_steps, t_run0, t_win0)
            if mf is not None:
                mf.write(json.dumps(last) + "\n")
                mf.flush()
            bar.set_postfix(loss=f"{last['loss']:.4f}", steps_s=f"{last['steps_per_s']:.2f}")
            run.win_sums.zero_()
            run.win_n = 0
            win_steps = 0
            t_win0 = time.perf_counter()
        if done % args.ckpt_every == 0 or done == args.steps:
            ckpt_path = _save(args, info, run, cfg, order, ckdir, done)
    return last, ckpt_path, t_run0


def _finish(args: TrainArgs, info: DistInfo, run: _Run, cfg, out: Path) -> Path:
    """Per-rank replica digests (DDP) and the EMA weights exported as safetensors (main rank)."""
    from ditdeploy.artifact.files import write_json_atomic

    if info.distributed:  # every rank records what it holds, so replica agreement can be checked after the run
        write_json_atomic(out / "ranks" / f"rank{info.rank}.json", {
            "rank": info.rank, "world_size": info.world_size, "step": args.steps,
            "model_sha256": state_sha256(run.model.state_dict()), "ema_sha256": state_sha256(run.ema.state_dict())})
    ema_path = Path(args.export_ema) if args.export_ema else out / "ema.safetensors"
    if info.is_main:
        export_ema(run.ema, cfg, ema_path, {"step": args.steps, "seed": args.seed, "ema_decay": args.ema_decay,
                                            "preset": args.preset or ""})
    barrier(info)
    return ema_path


def _train(args: TrainArgs, info: DistInfo, ck: dict[str, Any] | None) -> dict[str, Any]:
    from tqdm import tqdm

    out = Path(args.out)
    ckdir = ckstate.checkpoint_dir(out)
    _check_out(args, info, out, ckdir, ck)
    source, cfg = _build_source(args, info, out)
    order = EpochOrder(len(source), args.global_batch, args.seed, info.world_size, info.rank)
    run = _build_run(args, info, cfg, len(source), ck)
    run.model.train()
    p_drop = float(cfg.class_dropout_prob)
    run.model.y_embedder.dropout_prob = 0.0  # dropout applied in _train_step from the per-step mask (same semantics)
    model_fn = _model_fn(args, info, run.model)
    metrics_path = _start_metrics(args, info, out, cfg, ck, run.start)
    bar = tqdm(total=args.steps, initial=run.start, desc="train", unit="step", dynamic_ncols=True,
               disable=not (info.is_main and args.progress))
    mf = open(metrics_path, "a") if info.is_main else None  # noqa: SIM115 - closed in finally
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    try:
        last, ckpt_path, t0 = _loop(args, info, run, model_fn, source, cfg, order, ckdir, mf, bar)
    finally:
        bar.close()
        if mf is not None:
            mf.close()
        with contextlib.suppress(AttributeError):
            run.model.y_embedder.dropout_prob = p_drop
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    ema_path = _finish(args, info, run, cfg, out)
    ran = args.steps - run.start
    return {"step": args.steps, "start_step": run.start, "loss": last.get("loss"), "wall_s": wall, "cpu_s": cpu,
            "steps_per_s": ran / wall if ran and wall > 0 else None, "ema_path": str(ema_path),
            "checkpoint": str(ckpt_path) if ckpt_path else None, "metrics": str(metrics_path),
            "world_size": info.world_size}
