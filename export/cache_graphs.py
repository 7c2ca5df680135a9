"""Two-graph export for feature reuse across steps: ONNX, and OpenVINO IR converted from it.

A full graph also returns the feature cache, a light graph takes it (see ``ditdeploy.feature_cache``).

Files for ``--out NAME.onnx``: ``NAME.onnx`` (inputs x, t, y; outputs ``out`` and ``cache`` (batch, 2*depth,
T, D)), ``NAME.light.onnx`` (inputs x, t, y, cache; output ``out``), external data beside each when large, and
ONE manifest ``NAME.onnx.json`` listing the sha256 of every file of both graphs, with ``cache_graphs = {light,
export_id, cache_shape, parity}``. Both graphs carry the same random ``ditdeploy.export_id`` in their ONNX
metadata, so a light graph from another export is refused at load even if someone rewrote the manifest.
Verified at export on ONNX Runtime CPU against torch: the full graph's ``out`` and ``cache`` and the light
graph's ``out`` (fed the torch cache) within the fp32 tolerance; a failure writes nothing.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.errors import ArtifactError, DitDeployError

__all__ = ["LIGHT_SUFFIX", "export_cache_graphs", "export_cache_graphs_openvino", "light_path"]

LIGHT_SUFFIX = ".light"
EXPORT_ID_KEY = "ditdeploy.export_id"


def light_path(full: str | os.PathLike) -> Path:
    """``NAME.onnx`` -> ``NAME.light.onnx`` (same rule for ``.xml``)."""
    p = Path(full)
    return p.with_name(p.stem + LIGHT_SUFFIX + p.suffix)


def _torch_refs(model: Any, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Torch full-step out/cache and light-step out (from that cache) for every feed."""
    import torch

    from ditdeploy.feature_cache import forward_from_cache, forward_with_cache

    refs = []
    with torch.inference_mode():
        for f in feeds:
            x, t, y = (torch.from_numpy(np.ascontiguousarray(f[k])) for k in ("x", "t", "y"))
            out, cache = forward_with_cache(model, x, t, y)
            light = forward_from_cache(model, x, t, y, cache)
            refs.append({"out": out.numpy(), "cache": cache.numpy(), "light": light.numpy()})
    return refs


def _export_one(module: Any, args: tuple, inputs: tuple, outputs: tuple, path: Path, opset: int,
                meta: dict[str, str]) -> list[Path]:
    from ditdeploy.export.onnx import (
        EXTERNAL_DATA_THRESHOLD,
        cleanup,
        drop_weights,
        dynamo_export,
        save_model,
        set_metadata,
    )

    dyn = {n: {0: "batch"} for n in inputs + outputs}
    ir_model = dynamo_export(module, args, inputs, outputs, dyn, opset)
    cleanup(ir_model)
    set_metadata(ir_model, meta)
    files = save_model(ir_model, path, EXTERNAL_DATA_THRESHOLD)
    drop_weights(ir_model)
    return files


FULL_OUTPUTS = ("out", "cache")


def _ort_full(sess: Any) -> Any:
    """The full graph on an ONNX Runtime session as ``feeds -> {"out", "cache"}``."""
    return lambda f: dict(zip(FULL_OUTPUTS, sess.run(list(FULL_OUTPUTS), f), strict=True))


def _ov_full(compiled: Any) -> Any:
    """The full graph on an OpenVINO compiled model as ``feeds -> {"out", "cache"}``."""
    def run(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        r = compiled(f)
        return {n: r[compiled.output(n)] for n in FULL_OUTPUTS}

    return run


def _verify(full: Path, light: Path, feeds: list[dict[str, np.ndarray]],
            refs: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Both ORT graphs vs torch (``parity.compare_runs``, fp32 row); NumericsError (nothing written) on a miss."""
    from ditdeploy.export.verify import ort_session
    from ditdeploy.proof.parity import compare_runs

    fs, ls = ort_session(full), ort_session(light)
    kw = {"thresholds": "fp32", "against": "torch"}
    f_res = compare_runs([{"out": r["out"], "cache": r["cache"]} for r in refs],
                         _ort_full(fs), feeds, what="cache graphs: the full graph", **kw)
    l_res = compare_runs([r["light"] for r in refs], lambda f: ls.run(["out"], f)[0],
                         [{**f, "cache": r["cache"]} for f, r in zip(feeds, refs, strict=True)],
                         what="cache graphs: the light graph", **kw)
    return {"backend": "onnxruntime-cpu", "reference": "torch-fp32 (ditdeploy.feature_cache)",
            "tolerance": f_res.tolerance(), "batches": [p.batch for p in f_res.of("out")],
            "worst": {"full_out": f_res.worst("out"), "full_cache": f_res.worst("cache"),
                      "light_out": l_res.worst()}, "passed": True}


def export_cache_graphs(model: Any, out_path: str | os.PathLike, *, opset: int | None = None, verify: bool = True,
                        batch_sizes: tuple[int, ...] = (1, 3), seed: int = 0, source: dict[str, Any] | None = None,
                        decoder: str | None = None) -> dict[str, Any]:
    """Export ``model`` (adaLN-Zero DiT) as a verified full + light ONNX pair at ``out_path``; return the manifest."""
    import torch

    from ditdeploy.artifact.files import atomic_dir, manifest_path, write_json_atomic
    from ditdeploy.artifact.manifest import make_manifest
    from ditdeploy.export.onnx import DEFAULT_OPSET, check_out_path, readable
    from ditdeploy.feature_cache import CacheFull, CacheLight
    from ditdeploy.proof.parity import probe_inputs
    from ditdeploy.runtimes.base import cache_shape

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "in_channels"):
        raise DitDeployError("export_cache_graphs needs a ditdeploy.models.DiT (with .config)")
    opset = opset or DEFAULT_OPSET
    out = check_out_path(out_path)
    light = light_path(out)
    finals = [out.with_name(out.name + ".data"), light.with_name(light.name + ".data"), light, out, manifest_path(out)]
    model = model.to("cpu").eval()
    full_m, light_m = CacheFull(model).eval(), CacheLight(model).eval()
    export_id = uuid.uuid4().hex
    meta = {"ditdeploy.kind": "denoiser", "ditdeploy.precision": "fp32", "ditdeploy.config": config.to_json(),
            EXPORT_ID_KEY: export_id}
    t0 = time.perf_counter()
    n, s = 2, config.input_size
    args = (torch.randn(n, config.in_channels, s, s), torch.tensor([1, 999]), torch.tensor([0, config.null_class]))
    cshape = cache_shape(config)
    with atomic_dir(finals) as tmp:
        files = _export_one(full_m, args, ("x", "t", "y"), ("out", "cache"), tmp / out.name, opset,
                            {**meta, "ditdeploy.cache_graph": "full"})
        files += _export_one(light_m, (*args, torch.randn(n, *cshape)), ("x", "t", "y", "cache"), ("out",),
                             tmp / light.name, opset, {**meta, "ditdeploy.cache_graph": "light"})
        parity = None
        if verify:
            feeds = probe_inputs(config, batch_sizes, seed)
            parity = _verify(tmp / out.name, tmp / light.name, feeds, _torch_refs(model, feeds))
        d = ["batch", config.in_channels, s, s]
        manifest = make_manifest(
            tmp / out.name, files, kind="denoiser", format="onnx", precision="fp32",
            config=dataclasses.asdict(config), opset=opset,
            io={"inputs": {"x": d, "t": ["batch"], "y": ["batch"]},
                "outputs": {"out": ["batch", config.out_channels, s, s], "cache": ["batch", *cshape]},
                "dtypes": {"x": "float32", "t": "int64", "y": "int64", "out": "float32", "cache": "float32"}},
            batch={"min": 1, "opt": max(batch_sizes), "max": None},
            parity=None if parity is None else {**parity, "worst": parity["worst"]["full_out"]},
            verified=parity is not None, source=source, decoder=decoder,
            cache_graphs={"light": light.name, "export_id": export_id, "cache_shape": ["batch", *cshape],
                          "parity": parity, "method": "FORA-style reuse of every block's attention and MLP output"},
            export_seconds=round(time.perf_counter() - t0, 3),
            exporter=f"torch.onnx.export(dynamo=True) torch {torch.__version__}",
        )
        write_json_atomic(tmp / manifest_path(out).name, manifest)
        readable(*files, tmp / manifest_path(out).name)
    return manifest


def export_cache_graphs_openvino(onnx_path: str | os.PathLike, out_xml: str | os.PathLike,
                                 verify: bool = True) -> dict[str, Any]:
    """Convert a verified two-graph ONNX export to two OpenVINO IRs (``NAME.xml`` + ``NAME.light.xml``).

    Parity: both IRs on OpenVINO CPU (f32) vs both ONNX graphs on ONNX Runtime CPU at batch 2 (the light graph fed
    the full graph's cache). One manifest ``NAME.xml.json`` lists every file of both IRs.
    """
    from ditdeploy.artifact.files import atomic_dir, manifest_path, write_json_atomic
    from ditdeploy.artifact.manifest import load_manifest, make_manifest
    from ditdeploy.errors import require
    from ditdeploy.export.onnx import readable

    src, xml = Path(onnx_path), Path(out_xml)
    if xml.suffix.lower() != ".xml":
        raise DitDeployError(f"OpenVINO IR output must end in .xml, got {xml.name}")
    src_m = load_manifest(src, verify=True)
    assert src_m is not None
    cg = src_m.get("cache_graphs")
    if not isinstance(cg, dict):
        raise ArtifactError(f"{src.name} is not a two-graph (--cache-graphs) export")
    ov = require("openvino", "openvino", "OpenVINO export")
    lxml = light_path(xml)
    finals = [xml.with_suffix(".bin"), lxml.with_suffix(".bin"), lxml, xml, manifest_path(xml)]
    with atomic_dir(finals) as tmp:
        files = []
        for onnx_file, target in ((src, xml), (src.parent / cg["light"], lxml)):
            ov.save_model(ov.convert_model(str(onnx_file)), str(tmp / target.name), compress_to_fp16=False)
            files += [tmp / target.with_suffix(".bin").name, tmp / target.name]
        fields = src_m.derive(xml, format="openvino",
                              openvino={"version": ov.__version__, "inference_precision_hint": "f32",
                                        "compress_to_fp16": False},
                              cache_graphs={**cg, "light": lxml.name, "parity": None})
        if verify:
            fields["cache_graphs"]["parity"] = _ov_parity(src, src.parent / cg["light"], tmp / xml.name,
                                                          tmp / lxml.name, src_m)
            fields["parity"] = fields["cache_graphs"]["parity"]["full_out"]
        manifest = make_manifest(tmp / xml.name, files, **fields)
        write_json_atomic(tmp / manifest_path(xml).name, manifest)
        readable(*files, tmp / manifest_path(xml).name)
    return manifest


def _ov_parity(full_onnx: Path, light_onnx: Path, full_xml: Path, light_xml: Path,
               m: dict[str, Any]) -> dict[str, Any]:
    """Both IRs on OpenVINO CPU f32 vs both ONNX graphs on ONNX Runtime CPU (``parity.compare_runs``, fp32 row), the
    light graphs fed the ONNX full graph's cache; NumericsError (nothing written) on a miss."""
    from ditdeploy.export.openvino import parity_feeds
    from ditdeploy.export.verify import ort_session
    from ditdeploy.proof.parity import compare_runs
    from ditdeploy.runtimes.openvino import compile_config, compile_cpu

    feeds = parity_feeds(m)
    fs, ls = ort_session(full_onnx), ort_session(light_onnx)
    fc = compile_cpu(str(full_xml), compile_config("f32"))
    lc = compile_cpu(str(light_xml), compile_config("f32"))
    kw = {"thresholds": "fp32", "against": "ONNX Runtime"}
    full = compare_runs(_ort_full(fs), _ov_full(fc), [feeds], what="OpenVINO cache graphs: the full graph", keep_outputs=True, **kw)
    light_feeds = {**feeds, "cache": full.kept[0][1]["cache"]}
    light = compare_runs(lambda f: ls.run(["out"], f)[0], lambda f: lc(f)[lc.output(0)], [light_feeds],
                         what="OpenVINO cache graphs: the light graph", **kw)
    return {"reference": "onnxruntime CPU on the ONNX pair", "backend": "openvino CPU f32",
            "full_out": full.of("out")[0].report.metrics(), "full_cache": full.of("cache")[0].report.metrics(),
            "light_out": light.probes[0].report.metrics()}
