"""INT8 for the two-graph (``--cache-graphs``) artifact: feature reuse and INT8 in one artifact.

``quantize_cache_pair(pair_in, out, calibration, **int8_kwargs)`` quantizes the **full** graph of a verified fp32
pair with :func:`ditdeploy.calibration.quantize.quantize_int8` (same calibration set, same node policy, same checks)
and carries the **light** graph over unchanged: every GEMM of the light graph is an embedder, adaLN-gate or final
layer GEMM, the roles the INT8 policy keeps in float (``calibration.nodes``), and a light step costs < 0.1 % of a
full one (docs/less-work.md), so there is nothing worth quantizing there. The light graph therefore reads the feature
cache that the INT8 full graph wrote, as it will at sampling time.

Parity recorded in ``cache_graphs.parity`` (and checked): the INT8 pair against the fp32 pair on the calibration
set's held-out inputs: the full graph's ``out`` and ``cache``, and the light graph's ``out`` one step later (t - 40,
x moved) from each pair's own cache (what a sampler run sees); the per-call cosine limit is the int8 one of ``ditdeploy.proof.parity.THRESHOLDS``.

Files for ``out = NAME.onnx``: ``NAME.onnx`` (+ ``.data``), ``NAME.light.onnx`` (+ ``.data``), one manifest
``NAME.onnx.json`` listing every file, with the source pair's export id (both graphs carry it in their metadata).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.errors import ArtifactError, DitDeployError

__all__ = ["quantize_cache_pair"]

PARITY_INPUTS = 16  # held-out inputs compared pair against pair (stratified over timesteps)


def _copy_graph(src: Path, dst: Path) -> list[Path]:
    """Copy an ONNX graph to ``dst``; external data is renamed to ``<dst>.data`` (its location rewritten)."""
    import onnx

    from ditdeploy.calibration.quantize import external_data_files

    model = onnx.load(str(src), load_external_data=False)
    locs = external_data_files(model)
    if not locs:
        shutil.copyfile(src, dst)
        return [dst]
    if len(locs) > 1:
        raise ArtifactError(f"{src.name} spreads its weights over {len(locs)} files; re-export the pair")
    data = dst.with_name(dst.name + ".data")
    for init in model.graph.initializer:
        for kv in init.external_data:
            if kv.key == "location":
                kv.value = data.name
    onnx.save(model, str(dst))
    shutil.copyfile(src.parent / locs[0], data)
    return [data, dst]


def _parity_inputs(calibration: str | os.PathLike | None, cfg: Any) -> tuple[dict[str, np.ndarray], str]:
    """Held-out inputs of the calibration set (else its calibration inputs, else synthetic ones) and their name."""
    from ditdeploy.proof.parity import stacked_probe_inputs

    if calibration is None:
        return stacked_probe_inputs(cfg, PARITY_INPUTS), "synthetic inputs (x ~ N(0,1), t spread over 0..999)"
    from ditdeploy.calibration.capture import load_calibration

    calib = load_calibration(calibration)
    if calib.val is not None:
        return calib.val, "held-out validation inputs"
    return {"x": calib.x, "t": calib.t, "y": calib.y}, "calibration inputs (the set has no validation part)"


def _pair_run(full: Path, light: Path) -> Any:
    """A two-graph pair on ONNX Runtime as ``probe -> {full_out, full_cache, light_out}``: the full step on x, t, y,
    then the light step on the probe's next-step inputs from that step's own cache (what a sampler run sees)."""
    from ditdeploy.runtimes.onnxruntime import make_session

    fs, ls = make_session(full), make_session(light)

    def run(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out, cache = fs.run(["out", "cache"], {k: p[k] for k in ("x", "t", "y")})
        nxt = {"x": p["x_next"], "t": p["t_next"], "y": p["y"], "cache": cache}
        return {"full_out": out, "full_cache": cache, "light_out": ls.run(["out"], nxt)[0]}

    return run


def _pair_parity(fp32_full: Path, fp32_light: Path, q_full: Path, q_light: Path, pool: dict[str, np.ndarray],
                 src: str, batch: int) -> dict[str, Any]:
    """INT8 pair vs fp32 pair on ``pool`` (``parity.compare_runs``, pooled, int8 row on full out and light out; the
    cache recorded): full out / cache, and light out from each pair's own cache."""
    from ditdeploy.calibration.quantize import stratified_subset
    from ditdeploy.proof.parity import compare_runs

    idx = stratified_subset(np.asarray(pool["t"]), PARITY_INPUTS, seed=2)
    x, t, y = (np.ascontiguousarray(pool[k][idx]) for k in ("x", "t", "y"))
    rng = np.random.default_rng(3)
    # the light step as the sampler runs it: the next step (t 40 lower, x moved) from this step's cache
    probes = []
    for i in range(0, x.shape[0], batch):
        f = {"x": x[i:i + batch].astype(np.float32), "t": t[i:i + batch].astype(np.int64),
             "y": y[i:i + batch].astype(np.int64)}
        probes.append({**f, "x_next": f["x"] + np.float32(0.05) * rng.standard_normal(f["x"].shape, dtype=np.float32),
                       "t_next": np.maximum(f["t"] - 40, 0)})
    ref_run = _pair_run(fp32_full, fp32_light)
    refs = [ref_run(p) for p in probes]
    del ref_run  # one pair in memory at a time
    cmp = compare_runs(refs, _pair_run(q_full, q_light), probes, thresholds="int8", what="INT8 pair",
                       against="the fp32 pair", judge=("full_out", "light_out"), pooled=True, keep_outputs=True)
    res: dict[str, Any] = {"reference": "the fp32 pair on ONNX Runtime CPU", "backend": "onnxruntime CPU",
                           "inputs": int(x.shape[0]), "inputs_from": src}
    for name in ("full_out", "full_cache", "light_out"):
        res[name] = {**cmp.pooled[name].metrics(),
                     "per_call_cosine_min": float(min(r.cosine for r in cmp.rows(name)))}
    res["min_cosine_allowed"] = cmp.thresholds.call_cosine
    return res


def quantize_cache_pair(pair_in: str | os.PathLike, out: str | os.PathLike, calibration: str | os.PathLike | None,
                        **int8_kwargs: Any) -> dict[str, Any]:
    """Quantize the full graph of the fp32 pair ``pair_in`` to INT8 (``quantize_int8`` keyword arguments) and write
    it with the unchanged light graph as a two-graph artifact at ``out``; returns the manifest."""
    from ditdeploy.artifact.files import atomic_dir, manifest_path, write_json_atomic
    from ditdeploy.artifact.manifest import Manifest, make_manifest
    from ditdeploy.calibration.quantize import quantize_int8
    from ditdeploy.export.cache_graphs import light_path
    from ditdeploy.runtimes.base import light_graph

    src, out = Path(pair_in), Path(out)
    if out.suffix.lower() != ".onnx":
        raise DitDeployError(f"the INT8 pair is ONNX: {out.name} should end in .onnx")
    src_m = Manifest.load(src, verify=True)
    assert src_m is not None
    lg = light_graph(src, src_m)
    if lg is None:
        raise ArtifactError(f"{src.name} is not a two-graph (--cache-graphs) export")
    if src_m.precision != "fp32":
        raise DitDeployError(f"{src.name} is {src_m.precision}: quantize the fp32 pair")
    src_light = lg[0]
    light = light_path(out)
    if out.resolve() in (src.resolve(), src_light.resolve()) or light.resolve() in (src.resolve(),
                                                                                    src_light.resolve()):
        raise DitDeployError("the INT8 pair must not overwrite its fp32 source: choose another --out")
    finals = [out.with_name(out.name + ".data"), light.with_name(light.name + ".data"), light, out,
              manifest_path(out)]
    with atomic_dir(finals) as tmp:
        qm = Manifest.of(quantize_int8(src, tmp / out.name, calibration, **int8_kwargs))
        files = [tmp / n for n in qm.files] + _copy_graph(src_light, tmp / light.name)
        cg = dict(src_m.section("cache_graphs"))
        cg.update(light=light.name, light_precision="fp32 (embedder / adaLN-gate / final GEMMs: kept in float by "
                                                    "the INT8 policy)",
                  source_pair={"onnx": src.name, "light": src_light.name})
        cg["parity"] = None
        if int8_kwargs.get("verify", True):
            pool, what = _parity_inputs(calibration, src_m.config)
            cg["parity"] = _pair_parity(src, src_light, tmp / out.name, tmp / light.name, pool, what,
                                        int(int8_kwargs.get("batch_size", 8)))
        fields = {k: v for k, v in qm.items() if k not in ("manifest_version", "artifact", "files", "tools")}
        fields["cache_graphs"] = cg
        manifest = make_manifest(out, files, **fields)
        write_json_atomic(tmp / manifest_path(out).name, manifest)
    return manifest
