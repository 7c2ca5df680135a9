"""The VAE decoder in INT8 for CPU: static Q/DQ quantization of an exported decoder ONNX, calibrated on latents from
real sampling runs, per-channel symmetric INT8 weights, with its accuracy against the fp32 decoder recorded.

``quantize_decoder_int8(src, out, latents, val_latents)``: ONNX Runtime's ``quantize_static`` (QDQ format,
``per_channel=True``, weights int8 symmetric, activations uint8 by min/max over the calibration latents) on the
decoder's convolutions only (GroupNorm, SiLU, the mid-block attention and the up-sampling interpolation stay fp32).
Verification on ``val_latents`` (sampled with other seeds): PSNR of the INT8 decoder's images against the fp32
decoder's (pixels 0..255, after the [-1, 1] clamp) and rel-L2; below ``min_psnr_db`` (default: the ``int8-decoder``
row of ``ditdeploy.proof.parity.THRESHOLDS``, 30 dB) nothing is written. The weight
form follows ``target`` like the denoiser's (``calibration.quantize``): ``cpu-avx2`` (x86 without VNNI, the default
there) quantizes the weights to 7 bits (``reduce_range``) so the AVX2 u8s8 convolution kernels cannot saturate. The result is
a ``kind: decoder`` artifact with ``precision: int8`` that ``runtimes.load_decoder`` runs on ONNX Runtime or OpenVINO.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.errors import ArtifactError, DitDeployError

__all__ = ["quantize_decoder_int8"]


class _Reader:
    """onnxruntime CalibrationDataReader over latents, one at a time."""

    def __init__(self, latents: np.ndarray):
        self._it = iter([{"latents": latents[i:i + 1]} for i in range(len(latents))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _check_latents(name: str, z: Any, channels: int) -> np.ndarray:
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 4 or z.shape[0] < 1 or z.shape[1] != channels or not np.isfinite(z).all():
        raise DitDeployError(f"{name} must be finite latents (N, {channels}, h, w) with N >= 1, got {z.shape}")
    return np.ascontiguousarray(z)


def _images_255(sess: Any) -> Any:
    """The decoder on ``sess`` as ``{"latents"} -> images in 0..255`` (after the [-1, 1] clamp), float64."""
    return lambda f: (np.clip(sess.run(None, f)[0].astype(np.float64), -1.0, 1.0) + 1.0) * 127.5


def _accuracy(src: Path, q: Path, val: np.ndarray, min_psnr_db: float | None) -> dict[str, Any]:
    """The INT8 decoder's images vs the fp32 decoder's on ``val`` one latent at a time (``parity.compare_runs``,
    pooled, judged by THRESHOLDS ``int8-decoder``'s PSNR or ``min_psnr_db``); NumericsError (nothing written)."""
    from ditdeploy.export.verify import ort_session
    from ditdeploy.proof.parity import compare_runs, thresholds_for

    th = thresholds_for("int8-decoder").replace(psnr=min_psnr_db)
    res = compare_runs(_images_255(ort_session(src)), _images_255(ort_session(q, int8_exact=True)),
                       [{"latents": val[i:i + 1]} for i in range(len(val))], thresholds=th, what="INT8 decoder",
                       against="the fp32 decoder", pooled=True, data_range=255.0)
    rep = res.pooled[None]
    return {"reference": f"fp32 decoder {src.name} on ONNX Runtime CPU", "val_latents": int(len(val)),
            "psnr_db": float(res.pooled_psnr[None]), "rel_l2": rep.rel_l2, "max_abs_255": rep.max_abs,
            "min_psnr_db": th.psnr}


def quantize_decoder_int8(src: str | os.PathLike, out: str | os.PathLike, latents: Any, val_latents: Any, *,
                          min_psnr_db: float | None = None, source: str = "",
                          target: str | None = "auto") -> dict[str, Any]:
    """Quantize the fp32 decoder ONNX ``src`` to ``out`` (see module doc); returns the manifest. ``target``: auto
    (this CPU), cpu-vnni or cpu-avx2 (the decoder INT8 is a CPU artifact: activations uint8)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from ditdeploy.artifact.files import atomic_dir, manifest_path, write_json_atomic
    from ditdeploy.artifact.manifest import Manifest, load_manifest, make_manifest
    from ditdeploy.calibration.quantize import int8_form
    from ditdeploy.export.onnx import readable
    from ditdeploy.system.cpu_isa import resolve_int8_target

    tgt = resolve_int8_target(target)
    if tgt == "trt":
        raise DitDeployError("the INT8 VAE decoder is a CPU artifact (uint8 activations): use target auto, cpu-vnni "
                             "or cpu-avx2")
    reduce_range = tgt == "cpu-avx2"

    src, out = Path(src), Path(out)
    if out.suffix != ".onnx" or out.resolve() == src.resolve():
        raise DitDeployError(f"output {out} must be a new .onnx file beside nothing it would overwrite in {src.name}")
    m = load_manifest(src, verify=True)
    assert m is not None
    if m.get("kind") != "decoder" or m.get("precision") != "fp32":
        raise ArtifactError(f"{src.name} is not an fp32 VAE decoder artifact (kind {m.get('kind')!r}, precision "
                            f"{m.get('precision')!r})")
    ch = int(m.get("latent_channels") or 4)
    calib, val = _check_latents("latents", latents, ch), _check_latents("val_latents", val_latents, ch)
    with atomic_dir([out, manifest_path(out)]) as tmp:
        quantize_static(str(src), str(tmp / out.name), _Reader(calib), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv"], per_channel=True, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        acc = _accuracy(src, tmp / out.name, val, min_psnr_db)
        fields = Manifest.of(m, src).derive(
            out, format="onnx", precision="int8", parity=acc, verified=True,
            int8={"method": "onnxruntime quantize_static QDQ", "ops": ["Conv"],
                  "weights": f"int8 {'7-bit range (reduce_range) ' if reduce_range else ''}per-channel symmetric",
                  "activations": "uint8 min/max over the calibration latents", **int8_form(reduce_range, tgt)},
            calibration={"latents": int(len(calib)), "shape": list(calib.shape[1:]), "source": source,
                         "sha256": hashlib.sha256(calib.tobytes()).hexdigest()},
        )
        manifest = make_manifest(tmp / out.name, [tmp / out.name], **fields)
        write_json_atomic(tmp / manifest_path(out).name, manifest)
        readable(tmp / out.name, tmp / manifest_path(out).name)
    return manifest
