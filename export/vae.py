"""diffusers ``AutoencoderKL`` decoder -> verified ONNX (``latents`` -> ``image`` in [-1, 1]).

The graph takes the sampler's raw latents (N, 4, h, w) float32 and does everything after sampling: divide by the
VAE's ``scaling_factor`` (0.18215 for the SD VAEs DiT uses; plus ``shift_factor`` where a VAE config has one),
``post_quant_conv``, the decoder, and a clamp to [-1, 1]. Batch, height and width are dynamic, so one file serves
256 px (32x32 latents) and 512 px (64x64). Verification compares ONNX Runtime CPU with diffusers'
``vae.decode(latents / scaling_factor).sample`` (clamped) — the library's own API, not this module's wrapper.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ditdeploy.errors import DitDeployError

DECODER_INPUT = "latents"
DECODER_OUTPUT = "image"


class VaeDecoderGraph(nn.Module):
    """``latents -> clamp(decoder(post_quant_conv(latents / scaling_factor + shift)), -1, 1)``."""

    def __init__(self, vae: Any, scaling_factor: float | None = None, shift_factor: float | None = None):
        super().__init__()
        cfg = vae.config
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else cfg.scaling_factor)
        sf = shift_factor if shift_factor is not None else getattr(cfg, "shift_factor", None)
        self.shift_factor = float(sf) if sf is not None else None
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.decoder = vae.decoder

    def forward(self, latents):
        z = latents / self.scaling_factor
        if self.shift_factor is not None:
            z = z + self.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).clamp(-1.0, 1.0)


def _diffusers_reference(vae: Any, scaling_factor: float, shift_factor: float | None):
    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        z = torch.from_numpy(feed[DECODER_INPUT]) / scaling_factor
        if shift_factor is not None:
            z = z + shift_factor
        with torch.inference_mode():
            return vae.decode(z).sample.clamp(-1.0, 1.0).float().numpy()

    return run


def export_vae_decoder_onnx(
    vae: Any,
    out_path: str | os.PathLike,
    *,
    opset: int = 18,
    verify: bool = True,
    latent_sizes: Sequence[int] = (32,),
    batch_sizes: Sequence[int] = (1, 2),
    scaling_factor: float | None = None,
    tolerance: dict[str, float] | None = None,
    seed: int = 0,
    source: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Export a VAE decoder to ONNX at ``out_path`` (+ manifest, ``kind: "decoder"``); return the manifest.

    ``vae``: a diffusers ``AutoencoderKL`` or a local directory to load one from. ``latent_sizes`` x
    ``batch_sizes`` (zipped) are the verification shapes (ORT CPU vs diffusers ``decode``); a failed check raises
    ``NumericsError`` and leaves nothing at ``out_path``.
    """
    from ditdeploy.artifact.files import atomic_dir, manifest_path, write_json_atomic
    from ditdeploy.export.graph import MIN_OPSET
    from ditdeploy.export.onnx import check_out_path, move_into_place, readable
    from ditdeploy.export.profiling import PeakRSS, _stage_bar

    if opset < MIN_OPSET:
        raise DitDeployError(f"opset {opset} < {MIN_OPSET}")
    vae_dir = None
    if isinstance(vae, (str, os.PathLike)):
        vae_dir = Path(vae)
        from ditdeploy.sources.diffusers_snapshot import load_vae

        vae = load_vae(vae_dir)
    if not hasattr(vae, "decoder") or not hasattr(vae, "config"):
        raise DitDeployError("export_vae_decoder_onnx needs a diffusers AutoencoderKL or its directory")
    out = check_out_path(out_path)
    data_final = out.with_name(out.name + ".data")
    man_final = manifest_path(out)
    graph = VaeDecoderGraph(vae, scaling_factor).eval()
    if source is None and vae_dir is not None:
        source = _vae_source(vae_dir)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    with PeakRSS() as rss, atomic_dir([data_final, out, man_final]) as tmp:
        bar = _stage_bar(3, progress, f"export {out.name}")
        t0 = time.perf_counter()
        files, changes, stats = _trace_decoder(graph, int(vae.config.latent_channels), latent_sizes, opset,
                                               tmp / out.name)
        timings["export_s"] = time.perf_counter() - t0
        bar.update(1)
        parity = None
        if verify:
            t0 = time.perf_counter()
            parity = _verify_decoder(vae, graph, tmp / out.name, latent_sizes, batch_sizes, seed, tolerance)
            timings["verify_s"] = time.perf_counter() - t0
        else:
            warnings.warn(f"{out.name}: verification skipped (--no-verify): parity is NOT checked", stacklevel=2)
        bar.update(1)
        timings["total_s"] = time.perf_counter() - t_start
        manifest = _decoder_manifest(tmp / out.name, files, vae, graph, opset=opset, latent_sizes=latent_sizes,
                                     batch_sizes=batch_sizes, parity=parity, stats=stats, changes=changes,
                                     source=source, timings=timings, peak_rss=rss.peak)
        write_json_atomic(tmp / man_final.name, manifest)
        readable(*files, tmp / man_final.name)
        bar.update(1)
        bar.close()
    move_into_place(files, out, stale=[data_final])
    return manifest


def _vae_source(vae_dir: Path) -> dict[str, Any]:
    """Where the VAE came from: its folder and the sha256 of its weight files."""
    from ditdeploy.artifact.files import sha256_file

    source: dict[str, Any] = {"vae_dir": str(vae_dir)}
    weights = sorted(p for p in (vae_dir / "vae" if (vae_dir / "vae").is_dir() else vae_dir).glob("*")
                     if p.suffix in (".safetensors", ".bin"))
    if weights:
        source["weights"] = {p.name: sha256_file(p) for p in weights}
    return source


def _trace_decoder(graph: Any, latent_channels: int, latent_sizes: Sequence[int], opset: int,
                   path: Path) -> tuple[list[Path], dict[str, Any], dict[str, Any]]:
    """Trace the decoder graph (dynamic batch/height/width), clean it and save it; (files, cleanup, stats)."""
    from ditdeploy.export.graph import cleanup, dynamo_export, graph_stats, set_metadata
    from ditdeploy.export.onnxscript_compat import drop_weights
    from ditdeploy.export.protobuf_writer import save_model

    s = max(2, min(latent_sizes))
    ir_model = dynamo_export(
        graph, (torch.randn(2, latent_channels, s, s),), (DECODER_INPUT,), (DECODER_OUTPUT,),
        {DECODER_INPUT: {0: "batch", 2: "height", 3: "width"},
         DECODER_OUTPUT: {0: "batch", 2: "image_height", 3: "image_width"}}, opset,
    )
    changes = cleanup(ir_model)
    stats = graph_stats(ir_model)
    set_metadata(ir_model, {"ditdeploy.kind": "decoder", "ditdeploy.scaling_factor": repr(graph.scaling_factor)})
    files = save_model(ir_model, path)
    drop_weights(ir_model)
    return files, changes, stats


def _verify_decoder(vae: Any, graph: Any, path: Path, latent_sizes: Sequence[int], batch_sizes: Sequence[int],
                    seed: int, tolerance: dict[str, float] | None) -> dict[str, Any]:
    """ORT CPU vs diffusers ``decode`` (fp32, clamped) at each latent size x batch; raises beyond tolerance."""
    from ditdeploy.export.verify import check_parity
    from ditdeploy.proof.parity import decoder_probe_inputs

    # fp32 decoder: convolution reassociation only (~1e-6): the fp32 row of ditdeploy.proof.parity.THRESHOLDS
    feeds = decoder_probe_inputs(int(vae.config.latent_channels), latent_sizes, batch_sizes, seed)
    parity = check_parity(path, _diffusers_reference(vae, graph.scaling_factor, graph.shift_factor),
                          feeds, precision="fp32", tolerance=tolerance, what="VAE decoder ONNX")
    parity["reference"] = "diffusers AutoencoderKL.decode (fp32, clamped)"
    for b, f in zip(parity["batches"], feeds, strict=True):
        b["latent_shape"] = list(f[DECODER_INPUT].shape)
    return parity


def _decoder_manifest(path: Path, files: list[Path], vae: Any, graph: Any, *, opset: int,
                      latent_sizes: Sequence[int], batch_sizes: Sequence[int], parity: dict[str, Any] | None,
                      stats: dict[str, Any], changes: dict[str, Any], source: dict[str, Any] | None,
                      timings: dict[str, float], peak_rss: int) -> dict[str, Any]:
    """The decoder's manifest: VAE config, scaling, I/O, parity, graph summary, timings."""
    from ditdeploy.artifact.manifest import make_manifest

    latent_channels = int(vae.config.latent_channels)
    up = 2 ** (len(vae.config.block_out_channels) - 1)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(vae.config).items()
           if not k.startswith("_") and isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
    cfg["latent_size"] = int(latent_sizes[0])
    return make_manifest(
        path, files,
        kind="decoder",
        format="onnx",
        precision="fp32",
        opset=opset,
        config=cfg,
        latent_channels=latent_channels,
        upsample=up,
        scaling_factor=graph.scaling_factor,
        shift_factor=graph.shift_factor,
        io={"inputs": {DECODER_INPUT: ["batch", latent_channels, "height", "width"]},
            "outputs": {DECODER_OUTPUT: ["batch", int(vae.config.out_channels), f"{up}*height", f"{up}*width"]},
            "range": [-1.0, 1.0]},
        batch={"min": 1, "opt": max(batch_sizes), "max": None},
        parity=parity,
        verified=parity is not None,
        graph={"nodes": stats["nodes"], "ops": stats["ops"], "cleanup": changes},
        weight_bytes=stats["initializer_bytes"],
        source=source,
        export_seconds=round(timings["total_s"], 3),
        timings={k: round(v, 3) for k, v in timings.items()},
        peak_rss_bytes=peak_rss,
    )
