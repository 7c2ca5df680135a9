"""OpenVINO backend (CPU): reads an OpenVINO IR (.xml + .bin) or an ONNX file directly.

Precision: OpenVINO's CPU plugin silently executes fp32 models in bf16 on CPUs that support it (AVX-512 BF16 /
AMX), which costs ~2% rel-L2 on a DiT. This backend therefore sets ``INFERENCE_PRECISION_HINT=f32`` by default for
parity with torch (or the hint recorded at export in the manifest); pass ``precision_hint="bf16"`` (CLI ``--precision-hint bf16``) to trade accuracy for ~1.9x speed,
or ``"default"`` to leave OpenVINO's own choice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.artifact.files import manifest_path
from ditdeploy.artifact.manifest import Manifest
from ditdeploy.artifact.onnx_header import check_listed
from ditdeploy.errors import ArtifactError, DitDeployError
from ditdeploy.runtimes.base import (
    DECODER_INPUT,
    DENOISER_INPUTS,
    DecoderBase,
    DenoiserBase,
    check_dims,
    denoiser_shapes,
    int8_saturates_here,
    light_graph,
    physical_cores,
    read_manifest,
)
from ditdeploy.runtimes.registry import BackendSpec
from ditdeploy.system.altstack import keep_sigaltstack

BACKEND = BackendSpec("openvino", reads=(".xml", ".onnx"), claims=(".xml",), aliases=("ov",),
                      distributions=("openvino",), imports="openvino")

PRECISION_HINTS = {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16",
                   "default": None, "auto": None}
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
_SHORT = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def _ov():
    from ditdeploy.errors import require

    return require("openvino", "openvino", "the OpenVINO backend")


def compile_cpu(model: Any, cfg: dict[str, Any], device: str = "CPU") -> Any:
    """``ov.Core().compile_model`` keeping this thread's alternate signal stack (see ``ditdeploy.system.altstack``)."""
    with keep_sigaltstack():
        return _ov().Core().compile_model(model, device, cfg)


def compile_config(precision_hint: str | None = "f32", performance_hint: str = "LATENCY",
                   threads: int | None = None) -> dict[str, Any]:
    """The ``compile_model`` properties for a precision hint (f32/bf16/f16/default), performance hint, threads."""
    key = "default" if precision_hint is None else str(precision_hint).lower()
    if key not in PRECISION_HINTS:
        raise DitDeployError(f"unknown OpenVINO precision hint {precision_hint!r}: choose f32, bf16, f16 or default")
    perf = str(performance_hint).upper()
    if perf not in PERFORMANCE_HINTS:
        raise DitDeployError(f"unknown OpenVINO performance hint {performance_hint!r}: {', '.join(PERFORMANCE_HINTS)}")
    cfg: dict[str, Any] = {"PERFORMANCE_HINT": perf}
    if PRECISION_HINTS[key]:
        cfg["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[key]
    cfg["INFERENCE_NUM_THREADS"] = int(threads) if threads else physical_cores()
    return cfg


def _default_hint(m: Manifest, precision_hint: str | None) -> str | None:
    """Explicit hint, else the one recorded at export (``openvino.inference_precision_hint``), else f32."""
    if precision_hint is not None:
        return precision_hint
    return m.openvino_hint or "f32"


def _int8_note(m: Manifest, path: Path) -> None:
    """One warning line when ``m``'s full-range INT8 weights can saturate on this CPU (x86 without VNNI): OpenVINO
    has no switch to pick other kernels, so the artifact runs as it is."""
    int8_saturates_here(m, path, "OpenVINO", "OpenVINO runs it as it is (accuracy may drop: `ditdeploy check` it)")


def _manifest_for(path: Path, kind: str, verify: bool) -> Manifest:
    """Manifest of an .xml (its own) or of an .onnx read directly by OpenVINO (the ONNX manifest)."""
    if not manifest_path(path).exists():
        raise ArtifactError(
            f"no manifest {manifest_path(path).name} beside {path}: export with `ditdeploy export --fmt openvino`"
        )
    return read_manifest(path, kind, verify=verify)


class _Compiled:
    """A compiled OpenVINO model with one reusable infer request."""

    def __init__(self, path: Path, device: str, cfg: dict[str, Any]):
        ov = _ov()
        core = ov.Core()
        try:
            self.model = core.read_model(str(path))
        except Exception as e:  # openvino raises RuntimeError subclasses with multi-line text
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"OpenVINO cannot read {path.name}: {first}") from e
        try:
            self.compiled = compile_cpu(self.model, cfg, device)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DitDeployError(f"OpenVINO cannot compile {path.name} for {device}: {first}") from e
        self.request = self.compiled.create_infer_request()
        self.out = self.compiled.output(0)
        try:
            with keep_sigaltstack():
                self.exec_precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        except Exception:  # pragma: no cover - property missing on some devices
            self.exec_precision = "?"

    def inputs(self) -> dict[str, list[Any]]:
        out = {}
        for p in self.model.inputs:
            dims = [d.get_length() if d.is_static else None for d in p.get_partial_shape()]
            for n in p.get_names():
                out[n] = dims
        return out

    def output_dims(self) -> list[Any]:
        return [d.get_length() if d.is_static else None for d in self.model.outputs[0].get_partial_shape()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        res = self.request.infer(feeds)
        # results alias the request's buffers: copy before the next call overwrites them
        return np.array(res[self.out], dtype=np.float32, copy=True)


def _precision_name(manifest_precision: str, exec_precision: str) -> str:
    ep = exec_precision.lower().replace("<type: '", "").replace("'>", "")
    ep = {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "f16": "fp16",
          "float16": "fp16"}.get(ep, ep)
    return manifest_precision if ep in (manifest_precision, "?") else f"{manifest_precision}->{ep}"


class OpenVINODenoiser(DenoiserBase):
    """A denoiser (.xml IR or .onnx) compiled by OpenVINO."""

    def __init__(self, path: str | os.PathLike, *, device: str = "CPU", precision_hint: str | None = None,
                 performance_hint: str = "LATENCY", threads: int | None = None, verify: bool = True,
                 max_batch: int | None = None):
        self.path = Path(path)
        self.manifest = _manifest_for(self.path, "denoiser", verify)
        self.config = self.manifest.config
        check_listed(self.path, self.manifest, self.config)  # no unlisted (unverified) weights, as on ORT
        hint = _default_hint(self.manifest, precision_hint)
        _int8_note(self.manifest, self.path)
        self.compile_config = compile_config(hint, performance_hint, threads)
        self._m = _Compiled(self.path, device, self.compile_config)
        ins = self._m.inputs()
        missing_in = [n for n in DENOISER_INPUTS if n not in ins]
        if missing_in:
            raise ArtifactError(f"{self.path.name} lacks inputs {missing_in} (has {sorted(ins)}): not a denoiser")
        shapes = denoiser_shapes(self.config)
        for n in DENOISER_INPUTS:
            check_dims(n, ins[n], shapes[n], self.path)
        check_dims("out", self._m.output_dims(), shapes["out"], self.path)
        precision = self.manifest.precision
        self.exec_precision = self._m.exec_precision
        self.name = f"openvino:{device}:{_precision_name(precision, self.exec_precision)}"
        self.max_batch = max_batch or self.manifest.max_batch
        self._light: _Compiled | None = None
        lg = light_graph(self.path, self.manifest)
        if lg is not None:
            check_listed(lg[0], self.manifest)
            self._light = _Compiled(lg[0], device, self.compile_config)
            if "cache" not in {n for o in self._m.compiled.outputs for n in o.get_names()}:
                raise ArtifactError(f"{self.path.name} has no 'cache' output: not the full graph of a two-graph export")

    @property
    def supports_cache(self) -> bool:  # type: ignore[override]
        return self._light is not None

    def _run(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self._m({"x": x, "t": t, "y": y})

    def _run_full(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        res = self._m.request.infer({"x": x, "t": t, "y": y})
        c = self._m.compiled
        return (np.array(res[c.output("out")], dtype=np.float32, copy=True),
                np.array(res[c.output("cache")], dtype=np.float32, copy=True))

    def _run_light(self, x: np.ndarray, t: np.ndarray, y: np.ndarray, cache: np.ndarray) -> np.ndarray:
        assert self._light is not None
        return self._light({"x": x, "t": t, "y": y, "cache": cache})

    def close(self) -> None:
        self._m = None
        self._light = None


class OpenVINODecoder(DecoderBase):
    """A VAE decoder (.xml or .onnx) compiled by OpenVINO."""

    def __init__(self, path: str | os.PathLike, *, device: str = "CPU", precision_hint: str | None = None,
                 performance_hint: str = "LATENCY", threads: int | None = None, verify: bool = True,
                 max_batch: int | None = None):
        self.path = Path(path)
        self.manifest = _manifest_for(self.path, "decoder", verify)
        check_listed(self.path, self.manifest)
        hint = _default_hint(self.manifest, precision_hint)
        _int8_note(self.manifest, self.path)
        self._m = _Compiled(self.path, device, compile_config(hint, performance_hint, threads))
        ins = self._m.inputs()
        if DECODER_INPUT not in ins:
            raise ArtifactError(f"{self.path.name} lacks the input {DECODER_INPUT!r} (has {sorted(ins)})")
        self.latent_channels = self.manifest.latent_channels
        check_dims(DECODER_INPUT, ins[DECODER_INPUT], (None, self.latent_channels, None, None), self.path)
        precision = self.manifest.precision
        self.name = f"openvino:{device}:{_precision_name(precision, self._m.exec_precision)}"
        self.max_batch = max_batch or self.manifest.max_batch

    def _run(self, z: np.ndarray) -> np.ndarray:
        return self._m({DECODER_INPUT: z})

    def close(self) -> None:
        self._m = None


# the backend entry points used by ditdeploy.runtimes.load / load_decoder: their signatures are the option sets
load_denoiser = OpenVINODenoiser
load_decoder = OpenVINODecoder
