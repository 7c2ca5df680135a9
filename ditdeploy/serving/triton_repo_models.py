"""The Python-backend models of a Triton model repository written by ``ditdeploy export --fmt triton``.

Each generated ``model.py`` only makes ditdeploy importable and names one of these classes ``TritonPythonModel``, so
the repository carries no copy of the sampling math or of the wire protocol: the ``generate`` model parses requests with
:mod:`ditdeploy.serving.protocol` (``ditdeploy serve``'s), samples with :func:`ditdeploy.run.generation.sample_batch`
(``ditdeploy sample``'s noise contract: image i from ``(seed, first_index + i)``) and reaches the denoiser and the VAE
decoder through BLS (``pb_utils.InferenceRequest(...).exec()``), so Triton's dynamic batcher on ``denoise`` merges
the rows of every request in flight, each at its own step; ``InfoModel`` answers as ``ditdeploy serve``'s ``info``.
``PythonArtifactModel`` is the ``configs/python.pbtxt``
variant of ``denoise`` / ``vae_decoder``: the artifact on ONNX Runtime through :func:`ditdeploy.runtimes.load`
(manifest and sha256 checked), for servers that only have the Python backend (PyTriton's bundled tritonserver).

``triton_python_backend_utils`` exists only inside Triton's Python-backend stub; it is imported there, lazily.
numpy + the deploy path only (no torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.errors import DitDeployError

#: the model-config parameter that carries the repository's description to the generate model
SPEC_PARAMETER = "ditdeploy"
#: most images one generate request may ask for (the whole request is sampled as one batch)
MAX_IMAGES = 64


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
    """``generate``: ``ditdeploy serve``'s wire protocol (:mod:`ditdeploy.serving.protocol`): class ids in the INT64
    input ``labels`` or names in the ``class_names`` parameter, the sampling settings as request parameters; outputs
    ``images`` (uint8 NHWC) and ``labels`` (class ids). A bad request gets an error response; the others in the same ``execute`` are unaffected."""

    def initialize(self, args: dict[str, Any]) -> None:
        from ditdeploy.config.variants import DiTConfig
        from ditdeploy.run.generation import default_cfg

        spec = json.loads(_parameters(args)[SPEC_PARAMETER])
        self.config = DiTConfig(**spec["config"])
        self.id2label = {int(k): v for k, v in (spec.get("id2label") or {}).items()} or None
        self.default_cfg = default_cfg(self.config)
        d = spec["denoiser"]
        self.denoiser = BlsModel(d["model"], d["inputs"], d["output"], d["max_batch"], row_inputs=tuple(d["inputs"][1:]),
                                 config=self.config)
        dec = spec.get("decoder")
        self.decoder = BlsModel(dec["model"], [dec["input"]], dec["output"], dec["max_batch"]) if dec else None

    def _one(self, pb: Any, request: Any) -> Any:
        from ditdeploy.config.labels import resolve_items
        from ditdeploy.run import generation, images
        from ditdeploy.serving.protocol import GenerateRequest

        t = pb.get_input_tensor_by_name(request, "labels")
        try:
            params = json.loads(request.parameters() or "{}")
        except ValueError as e:
            raise DitDeployError(f"request parameters are not JSON: {e}") from None
        req = GenerateRequest.from_wire(t.as_numpy() if t is not None else None, params, MAX_IMAGES)
        s = req.sampling
        labels = np.asarray(resolve_items(req.labels, self.id2label, self.config.num_classes), dtype=np.int64)
        cfg_scale = s.cfg_scale if s.cfg_scale is not None else self.default_cfg
        if cfg_scale != 1.0 and self.config.class_dropout_prob == 0:
            raise DitDeployError("this model has no null class: cfg_scale must be 1")
        if s.cache_interval is not None:
            raise DitDeployError("cache_interval needs the --cache-graphs pair, which a Triton repository does not hold")
        idx = np.arange(req.first_index, req.first_index + len(labels), dtype=np.int64)
        x0 = generation.sample_batch(self.denoiser, s, cfg_scale, labels, idx)
        u8 = images.to_uint8(self.decoder(x0) if self.decoder is not None else x0)
        return pb.InferenceResponse(output_tensors=[pb.Tensor("images", u8), pb.Tensor("labels", labels)])

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


class InfoModel:
    """``info``: what ``ditdeploy serve``'s info model answers (``sample --server`` reads it first): the DiT config,
    class names, image shape, limits. No counters: Triton's metrics endpoint has them (``denoise``)."""

    def initialize(self, args: dict[str, Any]) -> None:
        from ditdeploy.config.variants import DiTConfig
        from ditdeploy.run.generation import default_cfg

        spec = json.loads(_parameters(args)[SPEC_PARAMETER])
        cfg = DiTConfig(**spec["config"])
        dec, den = spec.get("decoder"), spec["denoiser"]
        side = cfg.image_size
        self.answer = json.dumps({
            "config": spec["config"], "backend": f"triton {den['model']}", "decoder": dec["model"] if dec else None,
            "class_names": spec.get("id2label") or {}, "image_shape": [side, side, 3 if dec else cfg.in_channels],
            "default_cfg_scale": default_cfg(cfg), "supports_cache": False, "max_batch": den["max_batch"],
            "max_queue": spec.get("instances"), "max_images_per_request": MAX_IMAGES, "stats": None})

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = _pb()
        return [pb.InferenceResponse(output_tensors=[pb.Tensor("info", np.array([self.answer.encode()],
                                                                                dtype=np.object_))])
                for _ in requests]


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
