"""ONNX -> OpenVINO IR (.xml + .bin) with a manifest beside it, parity measured against ONNX Runtime.

``export_openvino(onnx_path, out_xml, precision_hint=None)``: ``ov.convert_model`` + ``ov.save_model`` with
``compress_to_fp16=False`` (OpenVINO's default would silently store fp16 weights), written atomically (data first,
manifest last). The manifest copies the ONNX manifest's model fields (kind, config, precision, batch, calibration
hash…) and records the OpenVINO version and the default ``INFERENCE_PRECISION_HINT`` the runtime will use
(``f32`` unless given: OpenVINO would otherwise run bf16 on CPUs that have it). Parity: the IR on OpenVINO CPU vs
the ONNX on ONNX Runtime CPU, on ``ditdeploy.proof.parity.probe_inputs`` at batch 2, gated by ``ditdeploy.proof.parity``'s
thresholds for the lossier of the artifact's precision and the hint.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.artifact.files import atomic_dir, manifest_path, write_json_atomic
from ditdeploy.artifact.manifest import Manifest, make_manifest
from ditdeploy.errors import ArtifactError, DitDeployError, require

# fields of the ONNX manifest that describe the model and carry over to the IR's manifest

def parity_feeds(m: dict[str, Any], batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """The conversion's parity inputs (``ditdeploy.proof.parity``'s probe generators) for a denoiser or decoder manifest."""
    from ditdeploy.proof.parity import decoder_probe_inputs, probe_inputs

    m = Manifest.of(m)
    if m.kind == "decoder":
        cfg = m.config_dict or {}
        s = int(cfg.get("latent_size") or cfg.get("input_size") or 4)
        return decoder_probe_inputs(m.latent_channels, (s,), (batch,), seed)[0]
    return probe_inputs(m.config, (batch,), seed)[0]


def _parity(onnx_path: Path, xml: Path, m: Manifest, hint: str) -> dict[str, Any]:
    """The IR on OpenVINO CPU vs the ONNX on ONNX Runtime CPU (``parity.compare_runs``), judged by the thresholds of
    the lossier of the artifact's precision and the inference hint; NumericsError (nothing written) when they miss."""
    from ditdeploy.proof.parity import compare_runs, lossiest
    from ditdeploy.runtimes.onnxruntime import make_session
    from ditdeploy.runtimes.openvino import compile_config, compile_cpu

    require("openvino", "openvino", "OpenVINO export")
    feeds = parity_feeds(m)
    sess = make_session(onnx_path)
    compiled = compile_cpu(str(xml), compile_config(hint))
    judged = lossiest(m.precision, hint)
    res = compare_runs(lambda f: sess.run(None, f)[0], lambda f: compiled(f)[compiled.output(0)], [feeds],
                       thresholds=judged, what=f"OpenVINO IR of {onnx_path.name} ({hint})",
                       against="ONNX Runtime")
    p = res.probes[0]
    return {"reference": f"onnxruntime CPU on {onnx_path.name}", "backend": f"openvino CPU {hint}",
            "batch": p.batch, **p.report.metrics(), "judged_as": judged, "tolerance": res.tolerance()}


def export_openvino(onnx_path: str | os.PathLike, out_xml: str | os.PathLike, precision_hint: str | None = None,
                    verify: bool = True) -> dict[str, Any]:
    """Convert an exported ONNX artifact to OpenVINO IR at ``out_xml`` (+ ``.bin`` + ``.xml.json`` manifest).

    ``precision_hint``: the default ``INFERENCE_PRECISION_HINT`` recorded for the runtime (f32 | bf16 | f16;
    None = f32). ``verify``: measure parity vs ONNX Runtime (recorded under ``parity``). Returns the manifest.
    """
    from ditdeploy.runtimes.openvino import PRECISION_HINTS

    src = Path(onnx_path)
    xml = Path(out_xml)
    if not src.exists():
        raise ArtifactError(f"no such ONNX file: {src}")
    if xml.suffix.lower() != ".xml":
        raise DitDeployError(f"OpenVINO IR output must end in .xml, got {xml.name}")
    hint_key = (precision_hint or "f32").lower()
    if hint_key not in PRECISION_HINTS or PRECISION_HINTS[hint_key] is None:
        raise DitDeployError(f"precision hint {precision_hint!r}: choose f32, bf16 or f16")
    hint = PRECISION_HINTS[hint_key]
    src_m = Manifest.load(src, verify=True)
    assert src_m is not None
    if src_m.kind not in ("denoiser", "decoder"):
        raise ArtifactError(f"{src.name}'s manifest has kind {src_m.kind!r}: expected denoiser or decoder")
    ov = require("openvino", "openvino", "OpenVINO export")
    try:
        model = ov.convert_model(str(src))
    except Exception as e:  # openvino's conversion errors are multi-line RuntimeErrors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"OpenVINO could not convert {src.name}: {first}") from e
    bin_path = xml.with_suffix(".bin")
    mpath = manifest_path(xml)
    with atomic_dir([bin_path, xml, mpath]) as tmp:
        txml = tmp / xml.name
        ov.save_model(model, str(txml), compress_to_fp16=False)
        fields = src_m.derive(xml, format="openvino", openvino={"version": ov.__version__,
                                                                "inference_precision_hint": hint,
                                                                "compress_to_fp16": False})
        if verify:
            fields["parity"] = _parity(src, txml, src_m, hint)
        manifest = make_manifest(xml, [tmp / bin_path.name, txml], **fields)
        write_json_atomic(tmp / mpath.name, manifest)
    readable([bin_path, xml, mpath])
    return manifest


def readable(paths: list[Path]) -> None:
    """Give exported files the umask's normal mode (temp files are created 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in paths:
        with contextlib.suppress(OSError):
            os.chmod(p, 0o644 & ~mask)
