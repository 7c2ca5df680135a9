"""``ditdeploy export --fmt triton``: a Triton Inference Server model repository around an ONNX denoiser.

The ONNX denoiser is one already exported. Layout (``REPO/``; model names are the ones ``ditdeploy serve``
uses)::

    ditdeploy_manifest.json       what the repository holds, sha256 of every file, how to run it
    denoise/config.pbtxt          the denoiser on ONNX Runtime (platform onnxruntime_onnx), dynamic batching
    denoise/configs/tensorrt.pbtxt   ... on TensorRT (platform tensorrt_plan;
                                     build 1/model.plan on the GPU first)
    denoise/configs/openvino.pbtxt   ... on OpenVINO (backend openvino, reading the same .onnx)
    denoise/configs/python.pbtxt     ... on ONNX Runtime inside the Python backend (PyTriton's bundled server)
    denoise/1/<artifact>.onnx (+ .json manifest, + .data external weights)   default_model_filename names it
    denoise/1/model.py            the Python-backend variant
                                  (ditdeploy.serving.triton_repo_models.PythonArtifactModel)
    vae_decoder/...               the same for the VAE decoder (latent models with a decoder)
    generate/config.pbtxt         the sampling loop (Python backend; calls denoise / vae_decoder through BLS),
                                  the DiT config and id2label in its ``ditdeploy`` parameter
    generate/1/model.py           ditdeploy.serving.triton_repo_models.GenerateModel
                                  (ditdeploy serve's wire protocol)
    info/config.pbtxt, 1/model.py the deployment's description, as ditdeploy serve's info model answers

Triton picks a variant with ``tritonserver --model-config-name tensorrt|openvino|python`` (a model without
that file in ``configs/`` keeps ``config.pbtxt``). The repository is built in a hidden folder beside ``REPO``
and renamed into place, so ``REPO`` either appears complete with its manifest or not at all. Standard library
and the artifact layer only (no torch): :func:`write_repository` packages an ONNX artifact that already
exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditdeploy.errors import DitDeployError
from ditdeploy.serving.triton_repo_models import (
    SPEC_PARAMETER as SPEC,  # the config parameter the Python models read
)

MANIFEST_NAME = "ditdeploy_manifest.json"
DENOISE, DECODER, GENERATE, INFO = "denoise", "vae_decoder", "generate", "info"
DECODER_INPUT = "latents"  # ditdeploy.export.vae.DECODER_INPUT (not imported: that module needs torch)
VARIANTS = ("tensorrt", "openvino", "python")
#: the dynamic batcher waits at most this long for more rows before it calls the denoiser
MAX_QUEUE_DELAY_US = 500
DEFAULT_MAX_BATCH = 64
DEFAULT_INSTANCES = 8
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
          "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "bytes": "TYPE_STRING"}

MODEL_PY = '''"""Triton Python-backend model written by `ditdeploy export --fmt triton`: {what}.

Needs ditdeploy importable by the Python backend's interpreter (`pip install ditdeploy` into the server's Python,
keeping the numpy its backend stub was built for). DITDEPLOY_PYTHONPATH (site folders separated by os.pathsep) goes
first on sys.path: the backend's embedded interpreter ignores PYTHONPATH.
"""
import os
import site
import sys

_before = list(sys.path)
for _p in filter(None, os.environ.get("DITDEPLOY_PYTHONPATH", "").split(os.pathsep)):
    site.addsitedir(_p)
sys.path[:] = [p for p in sys.path if p not in _before] + _before

from ditdeploy.serving.triton_repo_models import {cls} as TritonPythonModel  # noqa: E402,F401
'''


@dataclass(frozen=True)
class RepoOptions:
    """Knobs of the written configs (all editable in the config.pbtxt files afterwards)."""

    max_batch: int = DEFAULT_MAX_BATCH  # denoise rows per call (dynamic batcher limit)
    instances: int = DEFAULT_INSTANCES  # generate instances = requests sampled at once
    max_queue_delay_us: int = MAX_QUEUE_DELAY_US
    decoder_max_batch: int = 8


# ------------------------------------------------------------------------------------------ config.pbtxt text
def _q(s: str) -> str:
    """A protobuf text-format string literal (UTF-8 kept as is: the format has no \\u escapes)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dims(shape: Iterable[Any]) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape) + " ]"


def tensor(name: str, dtype: str, dims: Iterable[Any], *, scalar_rows: bool = False, optional: bool = False) -> str:
    """One ``input``/``output`` entry. ``scalar_rows``: a per-row scalar (model shape ``[batch]``), sent as dims
    ``[1]`` and reshaped to ``[]`` (Triton's documented idiom: dims may not be empty)."""
    if dtype not in _TYPES:
        raise DitDeployError(f"tensor {name}: dtype {dtype} has no Triton type")
    parts = [f"name: {_q(name)}", f"data_type: {_TYPES[dtype]}", f"dims: {_dims([1] if scalar_rows else dims)}"]
    if scalar_rows:
        parts.append("reshape: { shape: [ ] }")
    if optional:
        parts.append("optional: true")
    return "  {\n" + "".join(f"    {p}\n" for p in parts) + "  }"


def _list(key: str, entries: list[str]) -> str:
    return f"{key} [\n" + ",\n".join(entries) + "\n]\n"


def _parameters(params: dict[str, str]) -> str:
    return "".join(f"parameters {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}\n" for k, v in params.items())


@dataclass(frozen=True)
class ArtifactModel:
    """A batched model of the repository made from one exported artifact (denoiser or VAE decoder)."""

    name: str
    file: str  # the artifact's file name inside <name>/1/
    inputs: list[str]
    outputs: list[str]
    dims: dict[str, list[Any]]  # without the batch dimension
    dtypes: dict[str, str]
    scalar_rows: tuple[str, ...]  # inputs of model shape [batch]
    max_batch: int

    def _io(self) -> str:
        ins = [tensor(n, self.dtypes[n], self.dims[n], scalar_rows=n in self.scalar_rows) for n in self.inputs]
        outs = [tensor(n, self.dtypes[n], self.dims[n]) for n in self.outputs]
        return _list("input", ins) + _list("output", outs)

    def config(self, variant: str | None, delay_us: int) -> str:
        """config.pbtxt text: ``None`` = ONNX Runtime (the default), else one of ``VARIANTS``."""
        head = {None: 'platform: "onnxruntime_onnx"\n', "tensorrt": 'platform: "tensorrt_plan"\n',
                "openvino": 'backend: "openvino"\n', "python": 'backend: "python"\n'}[variant]
        filename = "model.plan" if variant == "tensorrt" else self.file
        text = (f"name: {_q(self.name)}\n{head}max_batch_size: {self.max_batch}\n"
                + (f"default_model_filename: {_q(filename)}\n" if variant != "python" else "")
                + self._io() + f"dynamic_batching {{\n  max_queue_delay_microseconds: {delay_us}\n}}\n")
        kind = {"tensorrt": "KIND_GPU", "openvino": "KIND_CPU", "python": "KIND_CPU"}.get(variant)
        if kind:  # the ONNX Runtime default leaves the kind to Triton: a GPU when there is one, else the CPU
            text += f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n"
        if variant == "python":
            text += _parameters({"artifact": self.file, "inputs": json.dumps(self.inputs), "output": self.outputs[0]})
        return text


def artifact_model(name: str, manifest: dict[str, Any], file: str, max_batch: int, order: tuple[str, ...],
                   scalar_rows: tuple[str, ...] = ()) -> ArtifactModel:
    """The repository model for an artifact, its tensors from the manifest's ``io`` table; ``order``: the input
    names in call order (the runtime contract: ``denoiser(x, t, y)``, ``decoder(latents)``)."""
    io = manifest.get("io") or {}
    ins, outs, dtypes = io.get("inputs") or {}, io.get("outputs") or {}, io.get("dtypes") or {}
    if sorted(ins) != sorted(order) or len(outs) != 1:
        raise DitDeployError(f"{file}: its manifest's io table lists inputs {sorted(ins)} and outputs {sorted(outs)}, "
                             f"expected inputs {list(order)} and one output: re-export it")
    dims = {n: list(s)[1:] for n, s in {**ins, **outs}.items()}
    cap = (manifest.get("batch") or {}).get("max")
    return ArtifactModel(name, file, list(order), list(outs), dims, {n: dtypes.get(n, "float32") for n in dims},
                         scalar_rows, min(max_batch, cap) if isinstance(cap, int) else max_batch)


def generate_config(spec: dict[str, Any], instances: int) -> str:
    """config.pbtxt of the ``generate`` model (``ditdeploy serve``'s wire protocol: class ids in ``labels`` or names in
    the ``class_names`` parameter, the sampling settings as request parameters; no batching: each request is one
    sampling loop, ``instances`` at once)."""
    c = spec["config"]
    latent = c.get("space", "latent") == "latent"
    size = c["input_size"] * (8 if latent else 1)
    outs = [tensor("images", "uint8", [-1, size, size, 3 if latent else c["in_channels"]]),
            tensor("labels", "int64", [-1])]
    return (f"name: {_q(GENERATE)}\nbackend: \"python\"\nmax_batch_size: 0\n"
            + _list("input", [tensor("labels", "int64", [-1], optional=True)]) + _list("output", outs)
            + f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]\n"
            + _parameters({SPEC: json.dumps(spec, sort_keys=True, ensure_ascii=False)}))


def info_config(spec: dict[str, Any]) -> str:
    """config.pbtxt of the ``info`` model (``query`` -> ``info`` JSON, as ``ditdeploy serve`` answers)."""
    return (f"name: {_q(INFO)}\nbackend: \"python\"\nmax_batch_size: 0\n"
            + _list("input", [tensor("query", "int64", [1])]) + _list("output", [tensor("info", "bytes", [1])])
            + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
            + _parameters({SPEC: json.dumps(spec, sort_keys=True, ensure_ascii=False)}))


# ------------------------------------------------------------------------------------------ the repository
def _copy_set(artifact: Path, dest: Path) -> list[Path]:
    """Copy an artifact, its manifest and the files the manifest lists into ``dest`` (hard links when possible)."""
    from ditdeploy.artifact.manifest import Manifest

    m = Manifest.load(artifact)  # sha256 verified before anything is copied
    dest.mkdir(parents=True, exist_ok=True)
    names = [*m.files, artifact.name + ".json"]
    for name in dict.fromkeys(names):
        src, dst = artifact.parent / name, dest / name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    return [dest / n for n in names]


def _model_py(folder: Path, what: str, cls: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(MODEL_PY.format(what=what, cls=cls))


def _write_model(root: Path, model: ArtifactModel, delay_us: int, cls: str, what: str) -> None:
    d = root / model.name
    (d / "configs").mkdir(parents=True, exist_ok=True)
    (d / "config.pbtxt").write_text(model.config(None, delay_us))
    for v in VARIANTS:
        (d / "configs" / f"{v}.pbtxt").write_text(model.config(v, delay_us))
    _model_py(d / "1", what, cls)


def build_repository(root: Path, denoiser: Path, decoder: Path | None, options: RepoOptions,
                     id2label: dict[int, str] | None = None) -> dict[str, Any]:
    """Lay out the repository in ``root`` (an empty folder) around the ONNX ``denoiser`` (and ``decoder``) artifacts
    with manifests; copies them in. Returns the repository manifest (also written to ``root``)."""
    from ditdeploy.artifact.files import folder_files, tool_versions, write_json_atomic
    from ditdeploy.artifact.manifest import Manifest
    from ditdeploy.config.labels import for_model, normalize

    dm = Manifest.load(denoiser)
    if dm.format != "onnx" or dm.kind not in (None, "denoiser"):
        raise DitDeployError(f"{denoiser.name} is a {dm.format} {dm.kind}: a Triton repository packages an ONNX "
                             "denoiser (export --fmt onnx)")
    if dm.get("cache_graphs"):
        raise DitDeployError(f"{denoiser.name} is a --cache-graphs pair: export a plain ONNX denoiser for Triton")
    cfg = dm.config
    _copy_set(denoiser, root / DENOISE / "1")
    den = artifact_model(DENOISE, dm, denoiser.name, options.max_batch, ("x", "t", "y"), scalar_rows=("t", "y"))
    _write_model(root, den, options.max_queue_delay_us, "PythonArtifactModel", "the denoiser on ONNX Runtime")
    dec = None
    if decoder is not None:
        dec_m = Manifest.load(decoder)
        _copy_set(decoder, root / DECODER / "1")
        dec = artifact_model(DECODER, dec_m, decoder.name, options.decoder_max_batch, (DECODER_INPUT,))
        _write_model(root, dec, options.max_queue_delay_us, "PythonDecoderModel", "the VAE decoder on ONNX Runtime")
    elif cfg.space == "latent":
        raise DitDeployError(f"{denoiser.name} is a latent-space model without a VAE decoder: export it with --vae "
                             "(the generate model returns images)")
    labels = normalize(id2label, cfg.num_classes) if id2label else for_model(dm, cfg.variant, cfg.num_classes)
    spec = {"config": dataclasses.asdict(cfg), "id2label": {str(k): v for k, v in sorted((labels or {}).items())},
            "denoiser": {"model": DENOISE, "inputs": den.inputs, "output": den.outputs[0], "max_batch": den.max_batch},
            "decoder": {"model": DECODER, "input": dec.inputs[0], "output": dec.outputs[0],
                        "max_batch": dec.max_batch} if dec else None, "instances": options.instances}
    for name, text, cls, what in (
            (GENERATE, generate_config(spec, options.instances), "GenerateModel",
             "the sampling loop (BLS calls to denoise / vae_decoder)"),
            (INFO, info_config(spec), "InfoModel", "the deployment's description (as ditdeploy serve's info)")):
        _model_py(root / name / "1", what, cls)
        (root / name / "config.pbtxt").write_text(text, encoding="utf-8")
    manifest = {
        "kind": "triton-repository", "models": [DENOISE, *([DECODER] if dec else []), GENERATE, INFO],
        "variants": {"default": "onnxruntime", **{v: f"--model-config-name {v}" for v in VARIANTS}},
        "config": dataclasses.asdict(cfg), "precision": dm.precision, "denoiser": denoiser.name,
        "decoder": decoder.name if decoder else None, "options": dataclasses.asdict(options),
        "requires": "the generate model (and the python variants) import ditdeploy inside Triton's Python backend",
        "tools": tool_versions(),
    }
    manifest["files"] = folder_files(root)
    write_json_atomic(root / MANIFEST_NAME, manifest)
    return manifest


def write_repository(denoiser: str | os.PathLike, out: str | os.PathLike, *, decoder: str | os.PathLike | None = None,
                     options: RepoOptions | None = None, id2label: dict[int, str] | None = None) -> dict[str, Any]:
    """Package an exported ONNX denoiser (and its VAE decoder: ``decoder``, else the one its manifest names) as a
    Triton model repository at ``out`` (a new or empty folder), published in one rename. Returns its manifest."""
    from ditdeploy.artifact.files import atomic_folder
    from ditdeploy.artifact.manifest import Manifest

    denoiser = Path(denoiser)
    if decoder is None:
        decoder = Manifest.load(denoiser).decoder_path()
    with atomic_folder(out) as tmp:
        return build_repository(tmp, denoiser, Path(decoder) if decoder else None, options or RepoOptions(), id2label)


def verify_repository(repo: str | os.PathLike) -> dict[str, Any]:
    """Read ``repo``'s manifest and check every file it lists (sha256); returns the manifest."""
    from ditdeploy.artifact.files import verify_folder

    return verify_folder(repo, MANIFEST_NAME)


def export_repository(net: Any, out: str | os.PathLike, *, precision: str, vae: str | os.PathLike | None,
                      options: RepoOptions, opset: int, verify: bool, seed: int, source: dict[str, Any],
                      id2label: dict[int, str] | None, progress: bool, calibration: str | None = None,
                      int8_mode: str = "static", int8_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``export --fmt triton``: export ``net`` to ONNX (and the VAE decoder of ``vae``) in a scratch folder beside
    ``out``, then :func:`write_repository` around them. Returns the repository manifest."""
    from ditdeploy.artifact.files import check_new_folder
    from ditdeploy.export import pipeline

    out = check_new_folder(out)  # before the slow export, not after it
    with pipeline.scratch_dir(out) as tmp:
        dec = None
        if vae is not None:
            dec = tmp / (pipeline.DECODER_NAME + ".onnx")
            pipeline.export_decoder(str(vae), dec, "onnx", opset=opset, verify=verify,
                                    latent_size=net.config.input_size, progress=progress)
        den = tmp / pipeline.default_out(net.config, precision, "onnx").name
        pipeline.export_denoiser(net, den, "onnx", precision, opset=opset, verify=verify, batch_max=options.max_batch,
                                 source=source, decoder=dec.name if dec else None, calibration=calibration,
                                 int8_mode=int8_mode, seed=seed, progress=progress, int8_options=int8_options,
                                 id2label=id2label)
        return write_repository(den, out, decoder=dec, options=options, id2label=id2label)


def build(job: Any) -> dict[str, Any]:
    """``--fmt triton``'s builder (``ditdeploy.artifact.formats``): the repository for an ``export.pipeline.ExportJob``."""
    options = RepoOptions(max_batch=job.batch_max or DEFAULT_MAX_BATCH,
                          instances=job.options.get("instances") or DEFAULT_INSTANCES)
    return export_repository(job.net, job.out, precision=job.precision, vae=job.vae, options=options,
                             opset=job.opset, verify=job.verify, seed=job.seed, source=job.source,
                             id2label=job.id2label, progress=job.progress, calibration=job.calibration,
                             int8_mode=job.int8_mode, int8_options=job.int8_options)
