"""ONNX Runtime backend: execution providers by availability (overridable) and throughput settings.

Providers: TensorRT EP > CUDA EP > CPU. Session options: all graph optimisations, intra-op threads = physical
cores (override ``threads=``), sequential execution, no spinning of idle worker threads (``spinning=True`` to
allow it). On GPU providers the output is bound on the device with I/O binding and copied back once per call.
An INT8 artifact whose full-range int8 weights would saturate on this CPU (x86 without VNNI,
``ditdeploy.system.cpu_isa``) is said in one warning line and run on ONNX Runtime's u8u8 kernels, which do not
saturate (``make_session(int8_exact=True)``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.artifact.onnx_header import check_against_manifest
from ditdeploy.errors import ArtifactError, DitDeployError
from ditdeploy.runtimes.base import (
    DECODER_INPUT,
    DENOISER_INPUTS,
    DecoderBase,
    DenoiserBase,
    check_dims,
    check_export_id,
    denoiser_shapes,
    int8_saturates_here,
    light_graph,
    missing,
    physical_cores,
    read_manifest,
)
from ditdeploy.runtimes.registry import BackendSpec

BACKEND = BackendSpec("onnxruntime", reads=(".onnx",), claims=(".onnx",), aliases=("ort", "onnx"),
                      distributions=("onnxruntime", "onnxruntime-gpu"), imports="onnxruntime")

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
SHORT = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
         "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
GPU_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}
X64_QUANT_PRECISION = "session.x64quantprecision"  # ORT: s8 weights -> u8 on x86 without VNNI (no int16 saturation)
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16,
              "tensor(int32)": np.int32}


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise missing(
            "onnxruntime",
            "the onnxruntime backend needs ONNX Runtime: pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA), "
            "not both",
        ) from e
    ort.set_default_logger_severity(log_level())
    return ort


def log_level() -> int:
    """ORT log severity: its own lines (e.g. "[E:onnxruntime:...] Non-zero status code ...") would reach stderr beside
    the one-line error that reports the same failure, so only fatal ones (4) unless --debug (2: warnings)."""
    return 2 if os.environ.get("DITDEPLOY_DEBUG") == "1" else 4


def choose_providers(requested: str | list[str] | tuple[str, ...] | None = None,
                     available: list[str] | None = None) -> list[str]:
    """Providers to use: ``requested`` (names or short names cpu/cuda/tensorrt, in order) or the best available.

    Raises a one-line DitDeployError when a requested provider is not available in this ONNX Runtime build.
    """
    if available is None:
        available = _ort().get_available_providers()
    if requested:
        if isinstance(requested, str):
            requested = [r for r in requested.split(",") if r.strip()]
            if not requested:  # e.g. " , " or "\r": naming nothing is an error, not a silent default
                raise DitDeployError("--provider names no provider (give e.g. cpu or cuda,cpu)")
        out = []
        for r in requested:
            name = SHORT.get(r.strip().lower(), r.strip())
            if name not in available:
                raise DitDeployError(
                    f"ONNX Runtime provider {name} is not available here (available: {', '.join(available)}); "
                    "GPU providers need onnxruntime-gpu"
                )
            out.append(name)
        if "CPUExecutionProvider" not in out:
            out.append("CPUExecutionProvider")  # fallback for nodes a GPU provider does not take
        return out
    return [p for p in PREFERENCE if p in available] or ["CPUExecutionProvider"]


def make_session(path: str | os.PathLike, providers: list[str] | tuple[str, ...] = ("CPUExecutionProvider",), *,
                 threads: int | None = None, optimize: bool = True, spinning: bool | None = None,
                 inter_op_threads: int | None = None, trt_cache: str | None = None, precision: str = "fp32",
                 int8_exact: bool = False) -> Any:
    """The one place an ONNX Runtime ``InferenceSession`` is created (backend, export verification, INT8, OpenVINO
    conversion parity). Options left ``None`` keep ONNX Runtime's defaults; log level errors-only; all graph
    optimisations unless ``optimize=False``; sequential execution. ``int8_exact``: on x86 CPUs without VNNI, ONNX
    Runtime converts int8 weights outside [-64, 64] to uint8 and runs its u8u8 kernels, which do not saturate
    (session option ``session.x64quantprecision``; a no-op on CPUs with VNNI and on 7-bit weights). A file ORT
    cannot load is a one-line ArtifactError."""
    ort = _ort()
    path = Path(path)
    so = ort.SessionOptions()
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        so.intra_op_num_threads = int(threads)
    if inter_op_threads:
        so.inter_op_num_threads = int(inter_op_threads)
    so.log_severity_level = log_level()
    if int8_exact:
        so.add_session_config_entry(X64_QUANT_PRECISION, "1")
    prov: list[Any] = []
    for p in providers:
        if p == "TensorrtExecutionProvider":
            cache = trt_cache or os.path.join(os.path.expanduser("~"), ".cache", "ditdeploy", "ort-trt")
            os.makedirs(cache, exist_ok=True)
            prov.append((p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                             "trt_fp16_enable": precision == "fp16"}))
        else:
            prov.append(p)
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=prov)
    except Exception as e:  # onnxruntime raises its own exception types (InvalidGraph, Fail, …)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"ONNX Runtime cannot load {path.name}: {msg}") from e


def _session(path: Path, providers: list[str], threads: int | None, trt_cache: str | None,
             precision: str, spinning: bool = False, int8_exact: bool = False) -> Any:
    """The backend's throughput settings: intra-op threads = physical cores, one inter-op thread, and no spinning
    of idle worker threads (they steal the cores the sampler's numpy work and other processes need: on a loaded
    2-core machine no spinning sampled the digits model 1.6x faster; ``spinning=True`` for a dedicated box)."""
    return make_session(path, providers, threads=int(threads) if threads else physical_cores(), spinning=spinning,
                        inter_op_threads=1, trt_cache=trt_cache, precision=precision, int8_exact=int8_exact)


def _int8_exact(m: Any, path: Path, providers: list[str]) -> bool:
    """Whether this CPU would saturate on ``m``'s INT8 weights (then said in one line, and ORT's u8u8 kernels used)."""
    return providers[0] == "CPUExecutionProvider" and int8_saturates_here(
        m, path, "ONNX Runtime", f"using ONNX Runtime's u8u8 kernels instead ({X64_QUANT_PRECISION}: no saturation, "
        "slower)")


def _io(sess: Any) -> tuple[dict[str, Any], list[Any]]:
    return {i.name: i for i in sess.get_inputs()}, list(sess.get_outputs())


class OrtDenoiser(DenoiserBase):
    """A denoiser ONNX artifact on an ONNX Runtime session."""

    def __init__(self, path: str | os.PathLike, *, providers: str | list[str] | None = None,
                 threads: int | None = None, verify: bool = True, io_binding: bool | None = None,
                 trt_cache: str | None = None, max_batch: int | None = None, spinning: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, "denoiser", verify=verify)
        self.config = self.manifest.config
        check_against_manifest(self.path, self.manifest, self.config)  # external data listed, config confirmed
        precision = self.manifest.precision
        self.providers = choose_providers(providers)
        exact = _int8_exact(self.manifest, self.path, self.providers)
        self.session = _session(self.path, self.providers, threads, trt_cache, precision, spinning, exact)
        ins, outs = _io(self.session)
        missing_in = [n for n in DENOISER_INPUTS if n not in ins]
        if missing_in:
            raise ArtifactError(f"{self.path.name} lacks inputs {missing_in} (has {sorted(ins)}): not a denoiser")
        shapes = denoiser_shapes(self.config)
        for n in DENOISER_INPUTS:
            check_dims(n, ins[n].shape, shapes[n], self.path)
        check_dims(outs[0].name, outs[0].shape, shapes["out"], self.path)
        self._types = {n: _ORT_TYPES.get(ins[n].type, np.float32) for n in DENOISER_INPUTS}
        self._out = outs[0].name
        used = self.session.get_providers()[0]
        self.name = f"onnxruntime:{used}:{precision}"
        self.max_batch = max_batch or self.manifest.max_batch
        self.io_binding = (used in GPU_PROVIDERS) if io_binding is None else bool(io_binding)
        self.light_session = None
        lg = light_graph(self.path, self.manifest)
        if lg is not None:
            lpath, export_id = lg
            check_against_manifest(lpath, self.manifest)  # the light graph's external data listed too
            self.light_session = _session(lpath, self.providers, threads, trt_cache, precision, spinning, exact)
            for p, sess in ((self.path, self.session), (lpath, self.light_session)):
                check_export_id(p, sess.get_modelmeta().custom_metadata_map.get("ditdeploy.export_id"), export_id)
            if "cache" not in {o.name for o in outs}:
                raise ArtifactError(f"{self.path.name} has no 'cache' output: not the full graph of a two-graph export")

    @property
    def supports_cache(self) -> bool:  # type: ignore[override]
        return self.light_session is not None

    def _run_full(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out, cache = self.session.run(["out", "cache"], self._feeds(x, t, y))
        return np.asarray(out, dtype=np.float32), np.asarray(cache, dtype=np.float32)

    def _run_light(self, x: np.ndarray, t: np.ndarray, y: np.ndarray, cache: np.ndarray) -> np.ndarray:
        assert self.light_session is not None
        out = self.light_session.run(["out"], {**self._feeds(x, t, y), "cache": cache})[0]
        return np.asarray(out, dtype=np.float32)

    def _feeds(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        arrs = {"x": x, "t": t, "y": y}
        return {n: (a if a.dtype == self._types[n] else a.astype(self._types[n])) for n, a in arrs.items()}

    def _run(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        feeds = self._feeds(x, t, y)
        if not self.io_binding:
            return np.asarray(self.session.run([self._out], feeds)[0], dtype=np.float32)
        b = self.session.io_binding()
        for n, a in feeds.items():
            b.bind_cpu_input(n, a)
        b.bind_output(self._out, "cuda")
        self.session.run_with_iobinding(b)
        return np.asarray(b.copy_outputs_to_cpu()[0], dtype=np.float32)

    def close(self) -> None:
        self.session = None
        self.light_session = None


class OrtDecoder(DecoderBase):
    """A VAE decoder ONNX artifact (input ``latents``, output ``image``) on ONNX Runtime."""

    def __init__(self, path: str | os.PathLike, *, providers: str | list[str] | None = None,
                 threads: int | None = None, verify: bool = True, trt_cache: str | None = None,
                 max_batch: int | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, "decoder", verify=verify)
        check_against_manifest(self.path, self.manifest)  # every external-data file listed (and so verified)
        precision = self.manifest.precision
        self.providers = choose_providers(providers)
        self.session = _session(self.path, self.providers, threads, trt_cache, precision,
                                int8_exact=_int8_exact(self.manifest, self.path, self.providers))
        ins, outs = _io(self.session)
        if DECODER_INPUT not in ins:
            raise ArtifactError(f"{self.path.name} lacks the input {DECODER_INPUT!r} (has {sorted(ins)})")
        self.latent_channels = self.manifest.latent_channels
        check_dims(DECODER_INPUT, ins[DECODER_INPUT].shape, (None, self.latent_channels, None, None), self.path)
        self._out = outs[0].name
        self.name = f"onnxruntime:{self.session.get_providers()[0]}:{precision}"
        self.max_batch = max_batch or self.manifest.max_batch

    def _run(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run([self._out], {DECODER_INPUT: z})[0], dtype=np.float32)

    def close(self) -> None:
        self.session = None


# the backend entry points used by ditdeploy.runtimes.load / load_decoder: their signatures are the option sets
load_denoiser = OrtDenoiser
load_decoder = OrtDecoder
