"""What ``ditdeploy export`` does, as plain functions: pick the weights, name the output, dispatch by format.

- weights: ``--checkpoint FILE`` (official .pt or our safetensors, via ``ditdeploy.sources.checkpoints.load_model``), the
  official file by name (from the cache, or downloaded with ``--download`` via ``ditdeploy.sources.official_weights``), the shipped
  ``digits`` model, or ``--random-weights`` (benchmarking only; must be asked for explicitly);
- formats: the registry ``ditdeploy.artifact.formats`` maps each ``--fmt`` to its builder here, which takes one
  :class:`ExportJob`: ``build_onnx``, ``build_openvino`` (ONNX, then ``ditdeploy.export.openvino.export_openvino``),
  ``build_trt`` (ONNX, then ``ditdeploy.export.tensorrt.build_engine``), ``build_aoti`` (no ONNX:
  ``ditdeploy.export.aoti``, a ``.pt2``), ``build_diffusers``; ``--precision int8`` goes through the fp32 ONNX and
  ``ditdeploy.calibration.quantize.quantize_int8`` (:meth:`ExportJob.onnx_source`). The ONNX intermediates of the
  non-ONNX paths live in a hidden temporary folder beside the output and are removed afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditdeploy.artifact.formats import get_format
from ditdeploy.errors import ArtifactError, DitDeployError

DECODER_NAME = "vae_decoder"


def slug(config: Any) -> str:
    """``XL/2`` at 256 px -> ``dit-xl-2-256``; ``digits`` -> ``digits``; custom configs -> ``dit-custom-<px>``."""
    v = str(getattr(config, "variant", "custom") or "custom")
    if v.lower() == "digits":
        return "digits"
    return f"dit-{v.lower().replace('/', '-')}-{config.image_size}"


def default_out(config: Any, precision: str, fmt: str) -> Path:
    """``<variant-slug>-<res>-<precision><ext>`` in the current directory (conditioning appended if not official)."""
    name = slug(config)
    cond = getattr(config, "conditioning", "adaln-zero")
    if cond != "adaln-zero":
        name += f"-{cond}"
    return Path(f"{name}-{precision}{get_format(fmt).suffix}")


def resolve_checkpoint(checkpoint: str, download: bool, say: Callable[[str], None] = print) -> Path:
    """An existing checkpoint path; an official file name is taken from the weights cache or, with ``download``,
    fetched (``ditdeploy.sources.official_weights.resolve_checkpoint``). Absent and not downloadable: a one-line error saying where
    to put the file and that ``--download`` fetches it."""
    from ditdeploy.sources import diffusers_snapshot, official_weights

    p = Path(checkpoint).expanduser()
    if p.is_dir():
        return p  # a diffusers snapshot folder (checked when it is read)
    if diffusers_snapshot.looks_like_hub_id(str(checkpoint)):
        raise diffusers_snapshot.hub_id_error(str(checkpoint))
    name = p.name if p.name.endswith(".pt") else p.name + ".pt"
    official = not p.exists() and name in official_weights.OFFICIAL_WEIGHTS
    if official and download and official_weights.cached_official(name) is None:
        say(f"downloading {name} ({official_weights.LICENSE}) into {official_weights.resolve_cache_dir()} ...")
    try:
        return official_weights.resolve_checkpoint(checkpoint, download=download)
    except ArtifactError as e:
        if official and not download:
            raise ArtifactError(f"{e}; or rerun with --download to fetch it") from e
        raise


def load_denoiser_model(
    model: str | None,
    checkpoint: str | None = None,
    *,
    random_weights: bool = False,
    image_size: int | None = None,
    conditioning: str | None = None,
    seed: int = 0,
    download: bool = False,
    say: Callable[[str], None] = print,
) -> tuple[Any, dict[str, Any]]:
    """The torch DiT to export and a ``source`` description for the manifest."""
    from ditdeploy.artifact.files import sha256_file

    is_digits = (model or "").lower() == "digits"
    if is_digits and image_size is not None:
        raise DitDeployError("the digits model is 8x8 pixel-space: --image-size does not apply to it")
    if checkpoint and random_weights:
        raise DitDeployError("--checkpoint and --random-weights exclude each other")
    if checkpoint is None and not random_weights and not is_digits:
        from ditdeploy.sources import official_weights

        official = official_weights.official_name(model or "", image_size or 256) if model else None
        if download and official:
            checkpoint = official
        else:
            hint = f" (official weights: --checkpoint {official}, add --download to fetch them)" if official else ""
            raise DitDeployError(
                f"no weights for {model}: pass --checkpoint FILE{hint}, or --random-weights to export untrained "
                "weights for benchmarking"
            )
    if random_weights:
        if model is None:
            raise DitDeployError("--random-weights needs --model VARIANT")
        from ditdeploy.export.randomize import random_model

        net = random_model(model, image_size=image_size or 256, seed=seed,
                           **({"conditioning": conditioning} if conditioning else {}))
        return net, {"kind": "random", "seed": seed, "note": "random weights (benchmarking only)"}
    from ditdeploy.sources.checkpoints import load_model

    if checkpoint is None:  # digits, shipped
        from ditdeploy.sources import shipped

        path = shipped.require_digits_checkpoint()
        kind = "shipped"
    else:
        path = resolve_checkpoint(checkpoint, download, say)
        kind = "checkpoint"
    net = load_model(path, model=model, image_size=image_size)
    if conditioning and net.config.conditioning != conditioning:
        raise DitDeployError(f"{path.name} is a {net.config.conditioning} model, not {conditioning}: drop "
                             "--conditioning (it only selects the block design of --random-weights)")
    if path.is_dir():
        return net, snapshot_source(path)
    return net, {"kind": kind, "path": str(path), "name": path.name, "sha256": sha256_file(path),
                 "bytes": path.stat().st_size}


def snapshot_source(path: Path) -> dict[str, Any]:
    """``source`` of a diffusers snapshot: its folder, a digest of the transformer files, and (not for the
    manifest's ``source``; the command pops them) its ``vae/`` folder and ``id2label``."""
    from ditdeploy.sources import diffusers_snapshot

    snap = diffusers_snapshot.locate(path)
    return {"kind": "diffusers", "path": str(path.resolve()), "name": path.name,
            "sha256": diffusers_snapshot.snapshot_digest(snap),
            "bytes": sum(f.stat().st_size for f in snap.weight_files),
            "vae": str(snap.vae) if snap.vae else None, "id2label": snap.id2label}


def class_names(net: Any, source: dict[str, Any]) -> dict[int, str] | None:
    """The id2label the exported artifact records: the snapshot's, or "0".."9" for the digits model."""
    from ditdeploy.config.labels import for_model

    if source.get("id2label"):
        return source["id2label"]
    return for_model(None, net.config.variant, net.config.num_classes)


@contextlib.contextmanager
def removed_on_failure(artifact: Path | None) -> Iterator[None]:
    """Delete ``artifact`` (and its manifest and external data) if the block fails: a decoder exported for a
    denoiser whose export then failed is not left behind on its own."""
    from ditdeploy.artifact.output_policy import artifact_files

    try:
        yield
    except BaseException:
        if artifact is not None:
            for f in artifact_files(artifact):  # itself, its manifest, its sidecars (.onnx.data, OpenVINO's .bin)
                f.unlink(missing_ok=True)
        raise


def _optional(module: str, attr: str, what: str) -> Callable[..., Any]:
    """``module.attr`` or a one-line DitDeployError saying that part is not available yet."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise DitDeployError(f"{what} is not available in this ditdeploy ({module} missing: {e})") from e
    fn = getattr(mod, attr, None)
    if fn is None:
        raise DitDeployError(f"{what} is not available in this ditdeploy ({module}.{attr} missing)")
    return fn


@contextlib.contextmanager
def scratch_dir(near: Path) -> Iterator[Path]:
    """A hidden temporary folder beside ``near`` (same filesystem), removed afterwards."""
    from ditdeploy.artifact.files import temp_dir

    near.parent.mkdir(parents=True, exist_ok=True)
    with temp_dir(near.parent, "export") as d:
        yield d


def export_decoder(vae_dir: str, out: Path, fmt: str, *, opset: int, verify: bool, latent_size: int,
                   progress: bool) -> dict[str, Any]:
    """VAE decoder to ONNX (or OpenVINO IR through ONNX) at ``out``; returns its manifest."""
    from ditdeploy.export.vae import export_vae_decoder_onnx

    if fmt == "openvino":
        export_ov = _optional("ditdeploy.export.openvino", "export_openvino", "OpenVINO export")
        with scratch_dir(out) as tmp:
            onnx_path = tmp / (out.stem + ".onnx")
            export_vae_decoder_onnx(vae_dir, onnx_path, opset=opset, verify=verify, latent_sizes=(latent_size,),
                                    progress=progress)
            return export_ov(onnx_path, out, verify=verify)
    return export_vae_decoder_onnx(vae_dir, out, opset=opset, verify=verify, latent_sizes=(latent_size,),
                                   progress=progress)


def export_cache_pair(net: Any, out: Path, fmt: str, *, opset: int, verify: bool, source: dict[str, Any],
                      decoder: str | None, seed: int = 0, int8: dict[str, Any] | None = None) -> dict[str, Any]:
    """``export --cache-graphs``: the verified full + light graph pair (ONNX, or OpenVINO IRs converted from it);
    with ``int8`` (``quantize_int8`` arguments incl. ``calibration``) the fp32 pair is exported to a scratch folder
    and its full graph quantized (``calibration.pair_int8``)."""
    from ditdeploy.export.cache_graphs import export_cache_graphs, export_cache_graphs_openvino
    from ditdeploy.feature_cache import check_cacheable

    check_cacheable(net)
    kw = dict(opset=opset, verify=verify, seed=seed, source=source, decoder=decoder)
    if int8 is not None:
        with scratch_dir(out) as tmp:
            fp32 = tmp / (out.stem + "-fp32.onnx")
            export_cache_graphs(net, fp32, **kw)
            return quantize_export(fp32, out, fmt, cache_graphs=True, verify=verify, **int8)
    if fmt == "onnx":
        return export_cache_graphs(net, out, **kw)
    if out.suffix.lower() != ".xml":
        raise DitDeployError(f"OpenVINO IR output must end in .xml, got {out.name}")
    with scratch_dir(out) as tmp:
        onnx_path = tmp / (out.stem + ".onnx")
        export_cache_graphs(net, onnx_path, **kw)
        return export_cache_graphs_openvino(onnx_path, out, verify=verify)


@dataclass
class ExportJob:
    """One denoiser export, as every format's builder receives it (``ditdeploy.artifact.formats``).

    ``options``: the format's own settings (``FormatSpec.options``: TensorRT's profile and dry run, AOTInductor's
    device...); ``id2label`` (class names) goes into the manifest and is carried through INT8 / OpenVINO /
    TensorRT; ``vae``: a VAE folder the format packs itself (diffusers).
    """

    net: Any
    out: Path
    fmt: str
    precision: str = "fp32"
    opset: int = 18
    verify: bool = True
    batch_max: int | None = None
    source: dict[str, Any] = field(default_factory=dict)
    decoder: str | None = None
    calibration: str | None = None
    int8_mode: str = "static"
    seed: int = 0
    progress: bool = True
    int8_options: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    id2label: dict[int, str] | None = None
    vae: Path | None = None

    def extra(self) -> dict[str, Any]:
        """Manifest fields every denoiser artifact records: its source checkpoint, random weights, class names."""
        src = self.source
        out: dict[str, Any] = {"source_checkpoint": ({"path": src.get("path"), "name": src.get("name"),
                                                      "sha256": src.get("sha256")}
                                                     if src.get("sha256") else None),
                               "random_weights": src.get("kind") == "random"}
        if self.id2label:
            out["id2label"] = {str(k): v for k, v in sorted(self.id2label.items())}
        return out

    def export_onnx(self, path: Path, precision: str) -> dict[str, Any]:
        """The denoiser as ONNX at ``path`` (``precision`` fp32 or fp16); returns its manifest."""
        from ditdeploy.export.onnx import export_denoiser_onnx

        return export_denoiser_onnx(self.net, path, precision=precision, opset=self.opset, verify=self.verify,
                                    batch_max=self.batch_max, seed=self.seed, source=self.source,
                                    decoder=self.decoder, extra=self.extra(), progress=self.progress,
                                    release_model=True)

    def quantize(self, onnx_path: Path, target: Path) -> dict[str, Any]:
        """``--precision int8``: the Q/DQ (or dynamic) INT8 ONNX of ``onnx_path`` at ``target``."""
        quantize = _optional("ditdeploy.calibration.quantize", "quantize_int8", "INT8 quantization")
        return quantize(onnx_path, target, self.calibration, mode=self.int8_mode, verify=self.verify,
                        progress=self.progress, **(self.int8_options or {}))

    @contextlib.contextmanager
    def onnx_source(self, int8_base: str = "fp32") -> Iterator[Path]:
        """A temporary ONNX of the denoiser at the job's precision, for formats built from ONNX (INT8: quantized
        from the ``int8_base`` export), in a hidden folder beside the output, removed afterwards."""
        base = int8_base if self.precision == "int8" else self.precision
        with scratch_dir(self.out) as tmp:
            onnx_path = tmp / f"{self.out.stem}-{base}.onnx"  # named apart from the output
            self.export_onnx(onnx_path, base)
            if self.precision == "int8":
                target = tmp / (self.out.stem + "-int8.onnx")
                self.quantize(onnx_path, target)
                onnx_path = target
            yield onnx_path


def build_onnx(job: ExportJob) -> dict[str, Any]:
    """``--fmt onnx``: fp32/fp16 directly; INT8 quantized from the fp32 export."""
    if job.precision != "int8":
        return job.export_onnx(job.out, job.precision)
    with scratch_dir(job.out) as tmp:
        onnx_path = tmp / f"{job.out.stem}-fp32.onnx"
        job.export_onnx(onnx_path, "fp32")
        return job.quantize(onnx_path, job.out)


def build_openvino(job: ExportJob) -> dict[str, Any]:
    """``--fmt openvino``: the IR converted from the (fp32/fp16/INT8) ONNX."""
    export_ov = _optional("ditdeploy.export.openvino", "export_openvino", "OpenVINO export")
    with job.onnx_source() as onnx_path:
        return export_ov(onnx_path, job.out, verify=job.verify)


def build_trt(job: ExportJob) -> dict[str, Any]:
    """``--fmt trt``: an engine built from the ONNX; INT8 is quantized from the fp16 export (strongly typed: layers
    without Q/DQ then run in fp16)."""
    build = _optional("ditdeploy.export.tensorrt", "build_engine", "TensorRT engine building")
    with job.onnx_source(int8_base="fp16") as onnx_path:
        return build(onnx_path, job.out, precision=job.precision, batch_max=job.batch_max, verify=job.verify,
                     progress=job.progress, **job.options)


def build_aoti(job: ExportJob) -> dict[str, Any]:
    """``--fmt aoti``: an AOTInductor ``.pt2`` compiled from the torch model (no ONNX)."""
    export_aoti = _optional("ditdeploy.export.aoti", "export_denoiser_aoti", "AOTInductor export")
    o = job.options
    calib = None
    if o.get("calibration") is not None:
        from ditdeploy.calibration.capture import load_calibration

        calib = load_calibration(o["calibration"])
    return export_aoti(job.net, job.out, device=o.get("device") or "cpu", precision=job.precision,
                       min_batch=o.get("min_batch"), max_batch=job.batch_max, verify=job.verify, seed=job.seed,
                       source=job.source, calibration=calib, extra={**job.extra(), "decoder": job.decoder})


def build_diffusers(job: ExportJob) -> dict[str, Any]:
    """``--fmt diffusers``: a DiTPipeline snapshot folder (its ``vae/`` copied from ``job.vae``)."""
    from ditdeploy.sources.diffusers_snapshot import write_snapshot

    return write_snapshot(job.net, job.out, vae=job.vae, id2label=job.id2label, verify=job.verify, seed=job.seed,
                          source=job.source)


def export_denoiser(net: Any, out: Path, fmt: str, precision: str, **settings: Any) -> dict[str, Any]:
    """Export ``net`` as ``fmt``/``precision`` to ``out`` through the format's builder (``ditdeploy.artifact.formats``);
    ``settings`` are :class:`ExportJob` fields. Returns the final artifact's manifest."""
    spec = get_format(fmt)
    job = ExportJob(net=net, out=Path(out), fmt=spec.name, precision=precision, **settings)
    unknown = sorted(set(job.options) - set(spec.options))
    if unknown:
        raise DitDeployError(f"--fmt {spec.name} does not take {', '.join(unknown)}")
    return spec.build(job)


def quantize_export(src: Path, out: Path, fmt: str, *, cache_graphs: bool, verify: bool,
                    calibration: str | None, **int8: Any) -> dict[str, Any]:
    """INT8 from an existing fp32 ONNX export ``src`` (plain, or a ``--cache-graphs`` pair): the graph is quantized
    as it is, nothing is exported again. ``fmt`` onnx (a pair stays ONNX: OpenVINO reads it) or openvino (plain)."""
    from ditdeploy.artifact.manifest import Manifest

    m = Manifest.load(src, verify=True)
    assert m is not None
    is_pair = isinstance(m.get("cache_graphs"), dict)
    if cache_graphs != is_pair:
        raise DitDeployError(f"{src.name} is {'a two-graph' if is_pair else 'a one-graph'} export: "
                             + ("add --cache-graphs" if is_pair else "drop --cache-graphs (or quantize a "
                                                                     "--cache-graphs export)"))
    if is_pair:
        if fmt != "onnx":
            raise DitDeployError("the INT8 pair is written as ONNX (--fmt onnx); OpenVINO runs it with "
                                 "--backend openvino")
        quantize_pair = _optional("ditdeploy.calibration.pair_int8", "quantize_cache_pair", "INT8 pairs")
        return quantize_pair(src, out, calibration, verify=verify, **int8)
    quantize = _optional("ditdeploy.calibration.quantize", "quantize_int8", "INT8 quantization")
    if fmt == "onnx":
        return quantize(src, out, calibration, verify=verify, **int8)
    if fmt != "openvino":
        raise DitDeployError(f"--checkpoint FILE.onnx --precision int8 writes onnx or openvino, not {fmt}")
    with scratch_dir(out) as tmp:
        q = tmp / (out.stem + "-int8.onnx")
        quantize(src, q, calibration, verify=verify, **int8)
        export_ov = _optional("ditdeploy.export.openvino", "export_openvino", "OpenVINO export")
        return export_ov(q, out, verify=verify)
