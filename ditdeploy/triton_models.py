"""The Python-backend models of a Triton model repository written by ``ditdeploy export --fmt triton``.

Each generated ``model.py`` is three lines that subclass one of these classes, so the repository carries no copy of
the sampling math: the ``generate`` model runs :func:`ditdeploy.diffusion.sample` (the sampler ``ditdeploy sample``
runs, with the same per-image noise contract of :mod:`ditdeploy.sharding`) and reaches the denoiser and the VAE
decoder through BLS (``pb_utils.InferenceRequest(...).exec()``), so Triton's dynamic batcher on ``denoise`` merges
the rows of every request in flight, each at its own step. ``PythonArtifactModel`` is the ``configs/python.pbtxt``
variant of ``denoise`` / ``vae_decoder``: the artifact on ONNX Runtime through :func:`ditdeploy.runtimes.load`
(manifest and sha256 checked), for servers that only have the Python backend (PyTriton's bundled tritonserver).

``triton_python_backend_utils`` exists only inside Triton's Python-backend stub; it is imported there, lazily.
numpy + the deploy path only (no torch).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.errors import DitDeployError

#: the model-config parameter that carries the repository's description to the generate model
SPEC_PARAMETER = "ditdeploy"
#: most images one generate request may ask for (the whole request is sampled as one batch)
MAX_IMAGES = 64
GENERATE_INPUTS = ("labels", "seed", "steps", "sampler", "cfg_scale", "eta", "cfg_interval")
GENERATE_OUTPUTS = ("images", "class_ids")


def _pb():
    import triton_python_backend_utils as pb_utils  # only inside Triton's Python-backend stub

    return pb_utils


def _parameters(args: dict[str, Any]) -> dict[str, str]:
    cfg = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}


def _error_response(pb: Any, message: str) -> Any:
    """A failed response with ``message`` (INVALID_ARG: HTTP 400 where the stub knows error codes)."""
    try:
        err = pb.TritonError(message, pb.TritonError.INVALID_ARG)
    except (AttributeError, TypeError):  # older stubs: no error codes
        err = pb.TritonError(message)
    return pb.InferenceResponse(output_tensors=[], error=err)


# ------------------------------------------------------------------------------------------ generate: the request
@dataclass(frozen=True)
class GenerateSettings:
    """One checked generate request."""

    labels: tuple[int, ...]
    seed: int = 0
    steps: int = 50
    sampler: str = "ddim"
    cfg_scale: float = 4.0
    eta: float = 0.0
    cfg_interval: tuple[int, int] | None = None


def _scalar(arrays: dict[str, np.ndarray], name: str, default: Any, kind: str) -> Any:
    a = arrays.get(name)
    if a is None:
        return default
    a = np.asarray(a).reshape(-1)
    if a.size != 1:
        raise DitDeployError(f"{name} must hold one value, got {a.size}")
    v = a[0]
    if kind == "str":
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    if kind == "int":
        if a.dtype.kind not in "iu":
            raise DitDeployError(f"{name} must be an integer, got {a.dtype}")
        return int(v)
    if a.dtype.kind not in "iuf":
        raise DitDeployError(f"{name} must be a number, got {a.dtype}")
    return float(v)


def parse_generate(arrays: dict[str, np.ndarray], num_classes: int, id2label: dict[int, str] | None,
                   null_class: bool = True) -> GenerateSettings:
    """The settings of a generate request from its input arrays (``GENERATE_INPUTS``); one-line DitDeployError
    for anything ``ditdeploy sample`` would refuse, and for more than ``MAX_IMAGES`` images."""
    from ditdeploy.generation import DEFAULT_CFG, SAMPLERS
    from ditdeploy.labels import resolve_items

    raw = arrays.get("labels")
    if raw is None or np.asarray(raw).size == 0:
        raise DitDeployError("labels is required: class ids or names, one per image")
    raw = np.asarray(raw).reshape(-1)
    if raw.size > MAX_IMAGES:
        raise DitDeployError(f"{raw.size} images requested: at most {MAX_IMAGES} per request")
    if raw.dtype.kind in "iu":
        items: list[int | str] = [int(v) for v in raw]
    else:
        items = []
        for v in raw:
            s = (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)).strip()
            items.append(int(s) if s.lstrip("-").isdigit() else s)
    labels = tuple(resolve_items(items, id2label, num_classes))
    seed = _scalar(arrays, "seed", 0, "int")
    steps = _scalar(arrays, "steps", 50, "int")
    sampler = _scalar(arrays, "sampler", "ddim", "str")
    cfg = _scalar(arrays, "cfg_scale", DEFAULT_CFG if null_class else 1.0, "float")
    eta = _scalar(arrays, "eta", 0.0, "float")
    interval = arrays.get("cfg_interval")
    if interval is not None:
        iv = np.asarray(interval).reshape(-1)
        if iv.size != 2 or iv.dtype.kind not in "iu":
            raise DitDeployError("cfg_interval must be two integer timesteps LO, HI")
        interval = (int(iv[0]), int(iv[1]))
    if seed < 0:
        raise DitDeployError(f"seed must be >= 0, got {seed}")
    if not 1 <= steps <= 1000:
        raise DitDeployError(f"steps must be in 1..1000, got {steps}")
    if sampler not in SAMPLERS:
        raise DitDeployError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if not math.isfinite(cfg) or cfg < 0:
        raise DitDeployError(f"cfg_scale must be a finite number >= 0 (1 = no guidance), got {cfg}")
    if not math.isfinite(eta) or eta < 0 or (eta != 0 and sampler != "ddim"):
        raise DitDeployError("eta must be a finite number >= 0 and is only used by the ddim sampler")
    from ditdeploy.diffusion import parse_cfg_interval

    parse_cfg_interval(interval)
    return GenerateSettings(labels, seed, steps, sampler, cfg, eta, interval)


def sample_images(denoiser: Any, decoder: Any, s: GenerateSettings, config: Any) -> np.ndarray:
    """uint8 NHWC images of one request: ``ditdeploy sample``'s sampler and noise contract (image i of the request
    from ``(seed, i)``), the decoder applied to latent models."""
    from ditdeploy import images, sharding
    from ditdeploy.diffusion import sample

    idx = np.arange(len(s.labels), dtype=np.int64)
    shape = (config.in_channels, config.input_size, config.input_size)
    x0 = sample(denoiser, sharding.initial_noise(s.seed, idx, shape), np.asarray(s.labels, dtype=np.int64),
                method=s.sampler, steps=s.steps, cfg_scale=s.cfg_scale, eta=s.eta, num_classes=config.num_classes,
                noise_fn=sharding.PerImageNoise(s.seed, idx), cfg_interval=s.cfg_interval)
    return images.to_uint8(decoder(x0) if decoder is not None else x0)


# ------------------------------------------------------------------------------------------ generate: BLS clients
class BlsModel:
    """``fn(*arrays) -> array`` that calls another model of the server through BLS, ``max_batch`` rows at a time."""

    def __init__(self, model: str, inputs: list[str], output: str, max_batch: int, row_inputs: tuple[str, ...] = (),
                 config: Any = None):
        self.model, self.inputs, self.output, self.max_batch = model, inputs, output, int(max_batch)
        self.row_inputs = row_inputs  # per-row scalars sent as (N, 1) (dims [1], reshaped to [] for the model)
        self.config = config  # the DiT config (``sample`` reads num_classes / class_dropout_prob from it)

    def _call(self, arrays: list[np.ndarray]) -> np.ndarray:
        pb = _pb()
        tensors = [pb.Tensor(n, np.ascontiguousarray(a.reshape(-1, 1) if n in self.row_inputs else a))
                   for n, a in zip(self.inputs, arrays, strict=True)]
        resp = pb.InferenceRequest(model_name=self.model, inputs=tensors, requested_output_names=[self.output]).exec()
        if resp.has_error():
            raise DitDeployError(f"{self.model}: {resp.error().message()}")
        return pb.get_output_tensor_by_name(resp, self.output).as_numpy()

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        n = arrays[0].shape[0]
        if n <= self.max_batch:
            return self._call(list(arrays))
        return np.concatenate([self._call([a[i: i + self.max_batch] for a in arrays])
                               for i in range(0, n, self.max_batch)])


class GenerateModel:
    """``generate``: labels (ids or names), seed, steps, sampler, cfg_scale, eta, cfg_interval -> uint8 NHWC images
    and the class ids. A bad request gets an error response; the others in the same ``execute`` are unaffected."""

    def initialize(self, args: dict[str, Any]) -> None:
        from ditdeploy.variants import DiTConfig

        spec = json.loads(_parameters(args)[SPEC_PARAMETER])
        self.config = DiTConfig(**spec["config"])
        self.id2label = {int(k): v for k, v in (spec.get("id2label") or {}).items()} or None
        d = spec["denoiser"]
        self.denoiser = BlsModel(d["model"], d["inputs"], d["output"], d["max_batch"], row_inputs=tuple(d["inputs"][1:]),
                                 config=self.config)
        dec = spec.get("decoder")
        self.decoder = BlsModel(dec["model"], [dec["input"]], dec["output"], dec["max_batch"]) if dec else None

    def _one(self, pb: Any, request: Any) -> Any:
        arrays = {}
        for name in GENERATE_INPUTS:
            t = pb.get_input_tensor_by_name(request, name)
            if t is not None:
                arrays[name] = t.as_numpy()
        s = parse_generate(arrays, self.config.num_classes, self.id2label, self.config.class_dropout_prob > 0)
        u8 = sample_images(self.denoiser, self.decoder, s, self.config)
        return pb.InferenceResponse(output_tensors=[pb.Tensor("images", u8),
                                                    pb.Tensor("class_ids", np.asarray(s.labels, dtype=np.int64))])

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = _pb()
        out = []
        for r in requests:
            try:
                out.append(self._one(pb, r))
            except DitDeployError as e:
                out.append(_error_response(pb, str(e)))
        return out

    def finalize(self) -> None:
        self.denoiser = self.decoder = None


# ------------------------------------------------------------------------------------------ denoise / vae_decoder
class PythonArtifactModel:
    """A denoiser or VAE decoder artifact on ONNX Runtime inside the Python backend (``configs/python.pbtxt``):
    the requests Triton's dynamic batcher hands over are concatenated into one call and split back."""

    kind = "denoiser"

    def initialize(self, args: dict[str, Any]) -> None:
        from ditdeploy import runtimes

        p = _parameters(args)
        path = Path(args["model_repository"]) / args["model_version"] / p["artifact"]
        threads = int(p["threads"]) if p.get("threads") else None
        load = runtimes.load if self.kind == "denoiser" else runtimes.load_decoder
        self.model = load(path, backend="onnxruntime", threads=threads)
        self.inputs = json.loads(p["inputs"])
        self.output = p["output"]

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = _pb()
        per = [[pb.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs] for r in requests]
        sizes = [a[0].shape[0] for a in per]
        joined = [np.concatenate([a[i] for a in per]) for i in range(len(self.inputs))]
        if self.kind == "denoiser":
            joined[1], joined[2] = joined[1].reshape(-1).astype(np.int64), joined[2].reshape(-1).astype(np.int64)
        try:
            out = np.asarray(self.model(*joined))
        except DitDeployError as e:
            return [_error_response(pb, str(e)) for _ in requests]
        bounds = np.cumsum([0, *sizes])
        return [pb.InferenceResponse(output_tensors=[pb.Tensor(self.output, np.ascontiguousarray(out[a:b]))])
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def finalize(self) -> None:
        self.model = None


class PythonDecoderModel(PythonArtifactModel):
    kind = "decoder"
