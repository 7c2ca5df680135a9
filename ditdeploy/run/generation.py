"""The library entry point for sampling: a typed :class:`SampleRequest` in, a typed :class:`SampleResult` out.

``ditdeploy sample`` maps its flags to a request and calls :func:`generate`; the bench scripts and any Python caller
do the same. ``--shards K`` workers receive their request as JSON (``python -m ditdeploy.run.generation REQ.json``).

Adding a sample option: add a field to :class:`SampleRequest` (JSON-able: str/int/float/bool/Path/list/None),
read it where it acts (below), and add its CLI flag in ``ditdeploy/commands/sample.py``. Serialisation to the
shard workers is generic over the fields.

Imports only the standard library at module import; numpy, the sampler and the chosen runtime load inside
:func:`generate`, and nothing on the path imports torch unless the torch backend is chosen.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditdeploy.run.deployment import OPTION_FLAGS

# DiT's sample.py demo classes (ImageNet ids), used when a model has many classes and no labels are given
IMAGENET_DEMO_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)
DEFAULT_PER_LABEL_SMALL = 6  # images per class for models with few classes (digits: 10 x 6 grid)
DEFAULT_BATCH = 64
DEFAULT_CFG = 4.0
GRID_MAX = 256  # images shown in the grid image when sampling many (the npz holds all)
GRID_FORMATS = {"png": "PNG", "jpg": "JPEG"}  # --output-format value -> PIL format
# the backend options `sample` sets, with the flag that sets each (one table: ditdeploy.run.deployment)
BACKEND_OPTIONS = OPTION_FLAGS

Say = Callable[[str], None]


@dataclass
class SampleRequest:
    """Everything one sampling run needs. Defaults are ``ditdeploy sample``'s."""

    engine: Path | None = None  # denoiser artifact; None: the shipped digits model
    backend: str | None = None  # onnxruntime | openvino | tensorrt | torch; None: from the file suffix
    options: dict[str, Any] = field(default_factory=dict)  # backend options, keys of BACKEND_OPTIONS
    vae: Path | None = None  # VAE decoder for latent models; None: the artifact manifest's "decoder"
    labels: list[int | str] | None = None  # class ids or names (id2label); None: every class or DiT's demo classes
    num_per_label: int | None = None  # images per label
    sampler: str = "ddim"
    steps: int = 50
    cfg_scale: float | None = None  # None: DEFAULT_CFG when the model has a null class, else 1 (off)
    eta: float = 0.0  # DDIM eta
    seed: int = 0
    batch_size: int | None = None  # images per sampler batch; None: min(DEFAULT_BATCH, images)
    out: Path | None = Path("samples.png")  # labelled grid image (None and npz None: results in memory only)
    output_format: str | None = None  # grid format png | jpg; None: from out's suffix (.jpg/.jpeg), else png
    npz: Path | None = None  # arr_0 (N,H,W,C) uint8 + labels (ADM evaluator layout)
    shards: int = 1  # split over this many worker processes, then merge
    shard: list[int] | None = None  # [index, count]: sample only this shard (a worker); None: all, or torchrun's
    guide_all_channels: bool = False  # CFG on all eps channels, not the official first 3
    progress: bool = False  # tqdm bar over sampling steps (stderr)
    cfg_interval: list[int] | str | None = None  # [lo, hi] or "LO,HI": guidance only at original timesteps lo..hi
    cache_interval: int | None = None  # feature reuse: every N-th step computes all blocks; None: off
    json_summary: Path | None = None  # write the run summary (work, GMACs, timings) here
    server: str | None = None  # URL of a `ditdeploy serve` server: the images come from it (ditdeploy.serving)

    def validate(self) -> None:
        """Reject bad values before anything loads (one-line DitDeployError naming the flag)."""
        from ditdeploy.diffusion import check_settings
        from ditdeploy.errors import DitDeployError

        interval = check_settings(self.sampler, self.steps, self.cfg_scale, self.eta, self.cfg_interval,
                                  self.cache_interval, flags=True)
        self.cfg_interval = list(interval) if interval is not None else None  # "LO,HI" parsed here, once
        checks = [
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (self.batch_size is None or self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.num_per_label is None or self.num_per_label >= 1,
             f"--num-per-label must be >= 1, got {self.num_per_label}"),
            (self.shards >= 1, f"--shards must be >= 1, got {self.shards}"),
            (self.options.get("threads") is None or self.options["threads"] >= 1,
             f"--threads must be >= 1, got {self.options.get('threads')}"),
            (self.output_format is None or self.output_format in GRID_FORMATS,
             f"--output-format must be one of {', '.join(GRID_FORMATS)}, got {self.output_format!r}"),
            (self.labels is None or len(self.labels) > 0, "--labels is empty"),
        ]
        for ok, msg in checks:
            if not ok:
                raise DitDeployError(msg)
        from ditdeploy.system.bounds import check_threads

        check_threads(self.options.get("threads"))
        implied = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}.get(self.out.suffix.lower() if self.out else "")
        if self.output_format and implied and implied != self.output_format:
            raise DitDeployError(f"--output-format {self.output_format} but --out {self.out} names a {implied} file: "
                                 "make them agree")
        if self.json_summary is not None and Path(self.json_summary).suffix.lower() != ".json":
            raise DitDeployError(f"--json {self.json_summary}: the run summary file must end in .json")
        unknown = sorted(set(self.options) - set(BACKEND_OPTIONS))
        if unknown:
            raise DitDeployError(f"unknown backend option(s) {', '.join(unknown)}: valid are "
                                 f"{', '.join(BACKEND_OPTIONS)}")
        if self.server is not None:
            local = [flag for flag, v in (("--engine", self.engine), ("--backend", self.backend), ("--vae", self.vae),
                                          ("--shard", self.shard)) if v is not None]
            local += [BACKEND_OPTIONS[k] for k, v in self.options.items() if v not in (None, False)]
            local += ["--shards"] if self.shards != 1 else []
            if local:
                raise DitDeployError(f"--server: {', '.join(local)} appl{'ies' if len(local) == 1 else 'y'} to a "
                                     "local run; the server chose its model and backend (`ditdeploy serve`)")

    def grid_format(self) -> str:
        """The grid's format: ``output_format``, else from ``out``'s suffix (.jpg/.jpeg: jpg), else png."""
        if self.output_format:
            return self.output_format
        suffix = self.out.suffix.lower() if self.out is not None else ""
        return "jpg" if suffix in (".jpg", ".jpeg") else "png"

    def to_json(self) -> str:
        """The request as JSON (paths as strings): what a shard worker receives."""
        return json.dumps({f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)})

    @classmethod
    def from_json(cls, text: str) -> SampleRequest:
        """The inverse of :meth:`to_json`; unknown keys are an error (a worker from another version)."""
        from ditdeploy.errors import DitDeployError

        d = json.loads(text)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - set(fields))
        if bad:
            raise DitDeployError(f"sample request has unknown field(s) {', '.join(bad)}")
        for k, v in d.items():
            if v is not None and str(fields[k].type).startswith("Path"):
                d[k] = Path(v)
        return cls(**d)


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple):
        return list(v)
    return v


@dataclass
class Timings:
    """Wall seconds of one run's stages."""

    total_s: float = 0.0
    load_s: float = 0.0
    denoiser_s: float = 0.0
    denoiser_calls: int = 0
    sampler_overhead_s: float = 0.0  # sampling time outside the denoiser calls
    decode_s: float = 0.0
    write_s: float = 0.0
    workers_s: float = 0.0  # --shards: the worker processes


@dataclass
class SampleResult:
    """What :func:`generate` produced. Arrays cover this process's images (``None`` in a ``--shards`` parent,
    whose images are in the merged npz)."""

    images: Any  # uint8 (N, H, W, C)
    labels: Any  # int64 (N,)
    latents: Any  # float32 (N, C, h, w): the sampler's x_0 before any VAE decode
    indices: Any  # int64 (N,): global image indices
    backend: str
    decoder: str | None
    cfg_scale: float  # as used (the default resolved)
    shard: tuple[int, int] | None
    written: list[str]
    timings: Timings
    count: int = 0  # images sampled (over every shard in a --shards parent)
    work: dict[str, Any] = field(default_factory=dict)  # denoiser calls/rows/light rows/GMACs (see work_summary)

    def summary(self) -> dict[str, Any]:
        """A flat JSON-able summary (paths, counts, timings)."""
        return {"backend": self.backend, "images": self.count, "written": list(self.written),
                "decoder": self.decoder, "cfg_scale": self.cfg_scale, **dataclasses.asdict(self.timings)}

    def run_summary(self, req: SampleRequest) -> dict[str, Any]:
        """``sample --json``: images, sampler, steps, guidance (scale, interval), cache interval, denoiser work
        (calls, rows, light rows, GMACs actually spent) and timings (load / denoiser / decode / overhead)."""
        t = self.timings
        other = t.total_s - t.load_s - t.denoiser_s - t.decode_s - t.workers_s
        return {
            "images": self.count, "backend": self.backend, "decoder": self.decoder, "written": list(self.written),
            "sampler": req.sampler, "steps": req.steps, "seed": req.seed,
            "guidance": {"scale": self.cfg_scale, "interval": list(req.cfg_interval) if req.cfg_interval else None},
            "cache_interval": req.cache_interval, "shards": req.shards,
            "denoiser": dict(self.work),
            "timings": {"load_s": t.load_s, "denoiser_s": t.denoiser_s, "decode_s": t.decode_s,
                        "overhead_s": max(0.0, other), "sampler_overhead_s": t.sampler_overhead_s,
                        "write_s": t.write_s, "workers_s": t.workers_s, "total_s": t.total_s},
        }


def work_summary(cfg: Any, timed: Any) -> dict[str, Any]:
    """Denoiser work of a run from its ``Timed`` wrapper: calls, rows, light (feature-reuse) rows, GMACs spent."""
    from ditdeploy.config.macs import full_macs, light_macs, spent_gmacs

    gmac = spent_gmacs(cfg, timed.rows - timed.light_rows, timed.light_rows)
    return {"calls": timed.calls, "rows": timed.rows, "light_calls": timed.light_calls,
            "light_rows": timed.light_rows, "gmac": float(f"{gmac:.6g}"),
            "gmac_per_full_row": full_macs(cfg) / 1e9, "gmac_per_light_row": light_macs(cfg) / 1e9}


# --------------------------------------------------------------------------------------------------------- labels
def parse_label_spec(spec: str) -> list[int | str]:
    """``"207, golden retriever"`` -> [207, "golden retriever"]: ids, and names resolved once the model (its
    id2label) is loaded (``ditdeploy.config.labels``)."""
    from ditdeploy.config.labels import parse_spec

    return parse_spec(spec)


def expand_labels(labels: list[int] | None, num_per_label: int | None,
                  num_classes: int, bound: Callable[[int], None] | None = None) -> tuple[list[int], int | None]:
    """The label of every image, in global index order, and the grid's row length when rows are classes.

    ``labels`` each repeated ``num_per_label`` times (default once); ``num_per_label`` alone: every class that many
    times; neither: every class ``DEFAULT_PER_LABEL_SMALL`` times for small class counts (<= 100), else DiT's demo
    classes once each.
    """
    from ditdeploy.errors import DitDeployError

    if num_per_label is not None and num_per_label < 1:
        raise DitDeployError(f"--num-per-label must be >= 1, got {num_per_label}")
    if labels:
        bad = [v for v in labels if not 0 <= v < num_classes]
        if bad:
            raise DitDeployError(f"labels {bad} out of range: this model has classes 0..{num_classes - 1}")
        base = list(labels)
    elif num_per_label is not None or num_classes <= 100:
        base = list(range(num_classes))
        num_per_label = num_per_label or DEFAULT_PER_LABEL_SMALL
    else:
        base = [v for v in IMAGENET_DEMO_LABELS if v < num_classes] or list(range(min(8, num_classes)))
    k = num_per_label or 1
    if bound is not None:
        bound(len(base) * k)  # refuse an absurd count before the list is built
    return [v for v in base for _ in range(k)], (k if k > 1 else None)


def parse_labels(spec: str | None, num_per_label: int | None, num_classes: int,
                 names: dict[int, str] | None = None) -> tuple[list[int], int | None]:
    """:func:`expand_labels` of a ``--labels`` spec string (or None); names resolved against ``names``."""
    from ditdeploy.config.labels import resolve

    return expand_labels(resolve(spec, names, num_classes) if spec else None, num_per_label, num_classes)


def row_len(labels) -> int | None:
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


# --------------------------------------------------------------------------------------------------------- loading
def _my_shard(req: SampleRequest) -> tuple[tuple[int, int] | None, bool]:
    """(this process's shard, whether it came from a torchrun-style environment)."""
    from ditdeploy.errors import DitDeployError
    from ditdeploy.run import shard_workers

    if req.shard is not None:
        index, count = (int(v) for v in req.shard)
        if not 0 <= index < count:
            raise DitDeployError(f"shard {index}/{count}: needs 0 <= index < count")
        mine, from_env = (index, count), False
    elif req.shards == 1:
        mine, from_env = shard_workers.dist_env(), True
    else:
        mine, from_env = None, False
    if mine is not None and req.shards > 1:
        raise DitDeployError("--shards spawns its own workers: do not combine it with --shard or torchrun")
    return mine, from_env


# --------------------------------------------------------------------------------------------------------- running
def generate(req: SampleRequest, say: Say | None = None) -> SampleResult:
    """Run ``req``: sample, decode, write the npz and/or grid image; returns what was produced.

    ``say``: where progress lines go (default: nowhere). Bad values raise a one-line DitDeployError before
    anything loads; outputs are written atomically.
    """
    t_start = time.perf_counter()
    from ditdeploy.run.deployment import open_deployment

    say = say or (lambda s: None)
    req.validate()
    if req.server is not None:
        return _generate_remote(req, say, t_start)
    mine, from_env = _my_shard(req)
    dep = open_deployment(req.engine, req.backend, req.options, vae=req.vae)
    plan = _check_outputs(req, dep.path, mine)
    if req.shards > 1:
        return _generate_sharded(dataclasses.replace(req, engine=dep.path, backend=dep.backend), say, t_start,
                                 npz_through=plan.through(req.npz or ""))
    t0 = time.perf_counter()
    den, decoder = dep.denoiser, dep.decoder
    timings = Timings(load_s=time.perf_counter() - t0)
    cfg_scale = req.cfg_scale if req.cfg_scale is not None else default_cfg(den.config)
    from ditdeploy.config.labels import display_names, resolve_items

    n_cls = den.config.num_classes
    names = dep.class_names
    ids = resolve_items(req.labels, names, n_cls) if req.labels else None
    all_labels, rows = expand_labels(ids, req.num_per_label, n_cls,
                                     bound=lambda n: _check_sizes(plan, n, den.config, decoder, mine, req.npz))
    res = _sample_range(den, decoder, req, cfg_scale, all_labels, mine, timings, say)
    t2 = time.perf_counter()
    res.written = _write_outputs(req, res, mine, from_env, len(all_labels), rows, display_names(names, n_cls))
    timings.write_s = time.perf_counter() - t2
    timings.total_s = time.perf_counter() - t_start
    _write_summary(req, res)
    return res


def default_cfg(cfg: Any) -> float:
    """The guidance scale when none is given: DiT's default with a null class, else 1 (off)."""
    return DEFAULT_CFG if cfg.class_dropout_prob > 0 else 1.0


def _generate_remote(req: SampleRequest, say: Say, t_start: float) -> SampleResult:
    """``sample --server URL``: the same labels, batches and outputs as a local run; the images come from the
    server (``ditdeploy.serving.client``), one ``generate`` request per batch, a few in flight at once."""
    from ditdeploy.config.labels import display_names, resolve_items
    from ditdeploy.serving import client

    plan = _check_outputs(req, None, None)
    info = client.server_info(req.server)
    n_cls, names = info.num_classes, info.class_names
    ids = resolve_items(req.labels, names, n_cls) if req.labels else None
    all_labels, rows = expand_labels(ids, req.num_per_label, n_cls,
                                     bound=lambda n: _check_sizes(plan, n, info.config, info.decoder, None, req.npz))
    say(f"sampling {len(all_labels)} image(s) on {req.server}…")
    res = client.sample_labels(req, info, all_labels)
    t2 = time.perf_counter()
    res.written = _write_outputs(req, res, None, False, len(all_labels), rows, display_names(names, n_cls))
    res.timings.write_s = time.perf_counter() - t2
    res.timings.total_s = time.perf_counter() - t_start
    _write_summary(req, res)
    return res


def _check_outputs(req: SampleRequest, engine: Path | None, mine: tuple[int, int] | None) -> Any:
    """The output policy (ditdeploy.artifact.output_policy) for this request, before anything loads."""
    from ditdeploy.artifact.output_policy import check_outputs
    from ditdeploy.errors import DitDeployError

    plan = check_outputs({"--engine": engine, "--vae": req.vae} if engine is not None else {},
                         {"--out": req.out, "--npz": req.npz, "--json": req.json_summary})
    if req.npz is not None and plan.through(req.npz) and mine is not None:
        raise DitDeployError(f"--npz {req.npz} is not a regular file: a sharded run writes its part beside --npz")
    return plan


def _check_sizes(plan: Any, n: int, cfg: Any, decoder: Any, mine: tuple[int, int] | None,
                 npz: Path | None) -> None:
    """Memory for this process's images and disk for the npz, before any sampling."""
    from ditdeploy.system.bounds import check_memory

    side = cfg.input_size * (8 if decoder is not None else 1)
    per_image = (3 if decoder is not None else cfg.in_channels) * side * side
    own = -(-n // mine[1]) if mine else n
    check_memory(own, per_image, f"{own} images of {side}x{side}", "sample fewer (--num-per-label, --labels) or "
                 "split them over processes with --shards N and --npz")
    if npz is not None:
        plan.check_space({"--npz": n * per_image})


def _write_summary(req: SampleRequest, res: SampleResult) -> None:
    if req.json_summary is not None:
        from ditdeploy.artifact.files import write_json_atomic

        write_json_atomic(req.json_summary, res.run_summary(req))
        res.written.append(str(req.json_summary))


def _sample_range(den, decoder, req: SampleRequest, cfg_scale: float, all_labels: list[int],
                  mine: tuple[int, int] | None, timings: Timings, say: Say) -> SampleResult:
    """Sample (and decode) this process's share of ``all_labels`` in batches."""
    import numpy as np

    from ditdeploy.run import images, shard_workers
    from ditdeploy.runtimes import Timed

    cfg = den.config
    start, stop = shard_workers.shard_range(len(all_labels), *mine) if mine else (0, len(all_labels))
    idx = np.arange(start, stop, dtype=np.int64)
    lab = np.asarray(all_labels, dtype=np.int64)[start:stop]
    bs = req.batch_size or min(DEFAULT_BATCH, max(1, len(idx)))
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    timed, timed_dec = Timed(den), (Timed(decoder) if decoder is not None else None)
    u8_parts, x0_parts, t_sampling = [], [], 0.0
    nb = (len(idx) + bs - 1) // bs
    for bi, i in enumerate(range(0, len(idx), bs)):
        bidx, blab = idx[i: i + bs], lab[i: i + bs]
        t1 = time.perf_counter()
        x0 = sample_batch(timed, req, cfg_scale, blab, bidx)
        t_sampling += time.perf_counter() - t1
        if req.progress and nb > 1:
            say(f"batch {bi + 1}/{nb} done")
        x0_parts.append(x0)
        u8_parts.append(images.to_uint8(timed_dec(x0) if timed_dec is not None else x0))
    timings.denoiser_s, timings.denoiser_calls = timed.seconds, timed.calls
    timings.sampler_overhead_s = max(0.0, t_sampling - timed.seconds)
    timings.decode_s = timed_dec.seconds if timed_dec else 0.0
    u8 = np.concatenate(u8_parts) if u8_parts else np.zeros((0, 1, 1, 1), np.uint8)
    x0 = np.concatenate(x0_parts) if x0_parts else np.zeros((0, *shape), np.float32)
    return SampleResult(images=u8, labels=lab, latents=x0, indices=idx, backend=den.name,
                        decoder=decoder.name if decoder is not None else None, cfg_scale=cfg_scale, shard=mine,
                        written=[], timings=timings, count=int(len(idx)), work=work_summary(cfg, timed))


def sample_batch(den: Any, req: SampleRequest, cfg_scale: float, labels: Any, indices: Any) -> Any:
    """x_0 latents for the images with global ``indices`` (int64) and ``labels``: the noise contract in one place.

    Image i's x_T and per-step noise derive from ``(req.seed, i)`` only (``ditdeploy.run.noise_contract``), so local
    batches, shard workers and the server's requests (``ditdeploy.serving``) make the same image for the same settings."""
    from ditdeploy.diffusion import sample as diffusion_sample
    from ditdeploy.run import noise_contract

    cfg = den.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    return diffusion_sample(
        den, noise_contract.initial_noise(req.seed, indices, shape), labels, method=req.sampler, steps=req.steps,
        cfg_scale=cfg_scale, eta=req.eta, num_classes=cfg.num_classes, guide_all_channels=req.guide_all_channels,
        noise_fn=noise_contract.PerImageNoise(req.seed, indices), progress=req.progress, cfg_interval=req.cfg_interval,
        cache_interval=req.cache_interval,
    )


def _write_outputs(req: SampleRequest, res: SampleResult, mine: tuple[int, int] | None, from_env: bool,
                   n_total: int, rows: int | None, class_names: list[str] | None = None) -> list[str]:
    """Write this process's npz (or shard part) and the grid (captioned with ``class_names`` when the model has
    them); under torchrun, rank 0 merges. Returns the paths."""
    from ditdeploy.errors import DitDeployError
    from ditdeploy.run import images, shard_workers

    written: list[str] = []
    if mine is None:
        if req.npz is not None:
            images.save_npz(req.npz, res.images, res.labels)
            written.append(str(req.npz))
        if req.out is not None:
            m = min(len(res.images), GRID_MAX)
            images.save_image(images.grid(res.images[:m], res.labels[:m], cols=rows, class_names=class_names), req.out,
                              GRID_FORMATS[req.grid_format()])
            written.append(str(req.out) + (f" (first {m} images)" if m < len(res.images) else ""))
        return written
    if req.npz is None:
        raise DitDeployError("a sharded run (--shard / torchrun) needs --npz FILE for its part")
    part = shard_workers.part_path(req.npz, *mine)
    images.save_npz(part, res.images, res.labels, index=res.indices)
    written.append(str(part))
    rank, world = mine
    if from_env and rank == 0:  # torchrun rank 0 merges once every part exists
        parts = [shard_workers.part_path(req.npz, r, world) for r in range(world)]
        shard_workers.wait_for_parts(parts, timeout=max(600.0, 10 * res.timings.load_s + 10 * res.timings.denoiser_s))
        shard_workers.merge_parts(req.npz, parts, n_total)
        written.append(str(req.npz))
        if req.out is not None:
            _write_grid_from_npz(req, rows, class_names)
            written.append(str(req.out))
    return written


def _write_grid_from_npz(req: SampleRequest, rows: int | None, class_names: list[str] | None = None) -> None:
    import numpy as np

    from ditdeploy.run import images

    with np.load(req.npz) as z:
        n = min(len(z["labels"]), GRID_MAX)
        lab = z["labels"][:n]
        arr = np.asarray(z["arr_0"][:n])
    images.save_image(images.grid(arr, lab, cols=rows, class_names=class_names), req.out,
                      GRID_FORMATS[req.grid_format()])


def _manifest_class_names(engine: Path | None) -> list[str] | None:
    """Grid captions from an artifact's manifest (the sharded parent does not load the model), else None."""
    from ditdeploy.artifact.manifest import Manifest
    from ditdeploy.config.labels import display_names, for_model
    from ditdeploy.errors import ArtifactError

    try:
        m = Manifest.load(engine, verify=False, required=False) if engine is not None else None
    except ArtifactError:
        return None
    cfg = (m or {}).get("config") or {}
    n = cfg.get("num_classes")
    return display_names(for_model(m, cfg.get("variant"), n), n) if isinstance(n, int) else None


def _generate_sharded(req: SampleRequest, say: Say, t_start: float, npz_through: bool = False) -> SampleResult:
    """Parent of ``shards`` worker processes: one JSON request each, then merge the parts and draw the grid."""
    import shutil
    import tempfile

    import numpy as np

    from ditdeploy.artifact.files import clean_stale_temps, temp_prefix, write_file_atomic
    from ditdeploy.errors import DitDeployError
    from ditdeploy.run import shard_workers
    from ditdeploy.runtimes.base import physical_cores

    k = req.shards
    final_npz, tmpdir = req.npz, None
    if final_npz is None or npz_through:  # parts + merge in a private folder (an npz device gets a copy)
        base = req.out.parent if req.out is not None and not npz_through else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        tmpdir = tempfile.mkdtemp(prefix=temp_prefix(kind="shards"), dir=base)
        final_npz = Path(tmpdir) / "samples.npz"
    each = max(1, (req.options.get("threads") or physical_cores()) // k)
    parts = [shard_workers.part_path(final_npz, i, k) for i in range(k)]
    clean_stale_temps(tempfile.gettempdir())  # a killed run's request folder
    reqdir = Path(tempfile.mkdtemp(prefix=temp_prefix(kind="requests")))
    try:
        cmds = []
        for i in range(k):
            sub = dataclasses.replace(req, shards=1, shard=[i, k], npz=final_npz, out=None, progress=False,
                                      options={**req.options, "threads": each},
                                      json_summary=reqdir / f"shard-{i}-of-{k}.summary.json")
            f = reqdir / f"shard-{i}-of-{k}.json"
            f.write_text(sub.to_json())
            cmds.append([sys.executable, "-m", "ditdeploy.run.generation", str(f)])
        say(f"running {k} shard processes ({each} thread(s) each)…")
        t0 = time.perf_counter()
        shard_workers.run_workers(cmds)
        t_workers = time.perf_counter() - t0
        shard_runs = [json.loads((reqdir / f"shard-{i}-of-{k}.summary.json").read_text()) for i in range(k)]
        n, _ = shard_workers.merge_parts(final_npz, parts)
        if npz_through:
            write_file_atomic(req.npz, final_npz)
        written = [str(req.npz)] if req.npz is not None else []
        if req.out is not None:
            with np.load(final_npz) as z:
                rows = row_len(z["labels"])
            _write_grid_from_npz(dataclasses.replace(req, npz=final_npz), rows, _manifest_class_names(req.engine))
            written.append(str(req.out))
    finally:
        for p in parts:
            p.unlink(missing_ok=True)
        shutil.rmtree(reqdir, ignore_errors=True)
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    if n == 0:
        raise DitDeployError("no images were sampled")
    res = _merged_result(shard_runs, written, int(n), t_workers, time.perf_counter() - t_start)
    _write_summary(req, res)
    return res


_ADDED_WORK = ("calls", "rows", "light_calls", "light_rows", "gmac")
_ADDED_TIMES = ("load_s", "denoiser_s", "decode_s", "sampler_overhead_s", "write_s")


def _merged_result(runs: list[dict[str, Any]], written: list[str], n: int, workers_s: float,
                   total_s: float) -> SampleResult:
    """A ``--shards`` parent's result from its workers' run summaries: the same fields as an unsharded run's
    (backend, decoder, guidance scale as used, denoiser work), work and stage seconds added over the shards."""
    first = runs[0]
    work = dict(first.get("denoiser") or {})
    for key in _ADDED_WORK:
        if key in work:
            work[key] = sum(r["denoiser"][key] for r in runs)
    if "gmac" in work:
        work["gmac"] = float(f"{work['gmac']:.6g}")
    times = {key: sum(float(r["timings"][key]) for r in runs) for key in _ADDED_TIMES}
    timings = Timings(total_s=total_s, workers_s=workers_s, denoiser_calls=int(work.get("calls", 0)), **times)
    return SampleResult(images=None, labels=None, latents=None, indices=None, backend=first["backend"],
                        decoder=first["decoder"], cfg_scale=first["guidance"]["scale"], shard=None, written=written,
                        timings=timings, count=n, work=work)


# --------------------------------------------------------------------------------------------------------- reporting
def _fmt_s(s: float) -> str:
    return f"{s:.3f} s" if s < 10 else f"{s:.1f} s"


def describe(req: SampleRequest, res: SampleResult) -> list[str]:
    """The two lines ``ditdeploy sample`` prints: what was sampled and written, and where the time went."""
    t = res.timings
    if req.shards > 1:
        return [f"sampled {res.count} image(s) in {req.shards} shards -> {', '.join(res.written)}",
                f"timing: total {_fmt_s(t.total_s)} | shard processes {_fmt_s(t.workers_s)} | "
                f"merge+grid {_fmt_s(t.total_s - t.workers_s)}"]
    if req.server is not None:
        return [f"sampled {res.count} image(s) on {res.backend} ({req.sampler}, {req.steps} steps, cfg "
                f"{res.cfg_scale:g}, seed {req.seed}) -> {', '.join(res.written)}",
                f"timing: total {_fmt_s(t.total_s)} | server requests {_fmt_s(t.denoiser_s)} | "
                f"write {_fmt_s(t.write_s)}"]
    shard = f", shard {res.shard[0]}/{res.shard[1]}" if res.shard else ""
    return [
        f"sampled {res.count} image(s) with {res.backend} ({req.sampler}, {req.steps} steps, cfg {res.cfg_scale:g}, "
        f"seed {req.seed}{shard}) -> {', '.join(res.written)}",
        f"timing: total {_fmt_s(t.total_s)} | load {_fmt_s(t.load_s)} | denoiser {_fmt_s(t.denoiser_s)} "
        f"({t.denoiser_calls} calls) | sampler overhead {_fmt_s(t.sampler_overhead_s)} "
        f"({100 * t.sampler_overhead_s / max(t.total_s, 1e-9):.2f}%) | decode {_fmt_s(t.decode_s)} | "
        f"write {_fmt_s(t.write_s)}",
    ]


# --------------------------------------------------------------------------------------------------------- worker
def main(argv: list[str] | None = None) -> int:
    """Shard worker: ``python -m ditdeploy.run.generation REQUEST.json`` runs one request; errors are one line."""
    from ditdeploy.errors import DitDeployError
    from ditdeploy.system import interrupts

    interrupts.install()  # SIGINT/SIGTERM/SIGHUP unwind: atomic writes remove their temp files
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 1:
            raise DitDeployError("usage: python -m ditdeploy.run.generation REQUEST.json (internal: shard workers)")
        req = SampleRequest.from_json(Path(args[0]).read_text())
        res = generate(req)
        for line in describe(req, res):
            print(line, file=sys.stderr)
        return 0
    except DitDeployError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a runtime's own failure: still one line for the parent to report
        print(f"error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
