"""What travels between ``sample --server`` and ``ditdeploy serve``: KServe v2 requests to three Triton models.

- ``generate``: input ``labels`` INT64 ``[n]`` (class ids), or instead the request parameter ``class_names``
  (names or ids separated by ``|``: "golden retriever|volcano"); request ``parameters`` carry the sampling settings (:data:`WIRE_FIELDS`, the names of :class:`~ditdeploy.run.generation.SampleRequest`'s
  fields) plus ``first_index`` (the global index of the first image: image i's noise comes from ``(seed,
  first_index + i)``, as in a local ``sample``) and ``timeout_s`` (the server drops the request after that).
  Outputs ``images`` UINT8 ``[n, H, W, C]`` and ``labels`` INT64 ``[n]``.
- ``denoise``: the artifact's own ``x`` FP32 ``[N, C, H, W]``, ``t``/``y`` INT64 ``[N, 1]`` (Triton's batch
  dimension first) -> ``out`` FP32 ``[N, C', H, W]``.
- ``info``: input ``query`` INT64 ``[1]`` (any) -> ``info`` BYTES ``[1]``: JSON with the model config, class names,
  limits and the batcher's counters.

No model takes a BYTES input: tritonserver 2.51's HTTP frontend dies (SIGSEGV) parsing a JSON BYTES input of 10^6
elements, whatever the model declares, before any model can refuse it; numeric inputs of that size are refused
with a 400.

Errors: the server raises :class:`WireError` with a Triton status name; ``triton_model.py`` (the Triton-side
proxy) turns it into an error response with that status (INVALID_ARG -> HTTP 400, UNAVAILABLE -> 503) and the
one-line reason. Stdlib only at import.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ditdeploy.errors import DitDeployError
from ditdeploy.run.generation import SampleRequest

# SampleRequest fields a generate request carries as KServe parameters; a new sampling option (e.g. a recipe)
# joins this tuple and travels with no other change
WIRE_FIELDS = ("sampler", "steps", "cfg_scale", "eta", "seed", "guide_all_channels", "cfg_interval", "cache_interval")
EXTRA_FIELDS = ("first_index", "timeout_s", "class_names")
# set by the Triton-side proxy (triton_model.py, which spells it too) on every request: names its cancel file
TOKEN_PARAMETER = "ditdeploy_token"
NAME_SEPARATOR = "|"
MAX_NAMES_CHARS = 65536
# request-level parameters Triton's frontends may add or consume themselves
TRITON_PARAMETERS = frozenset({"priority", "timeout", "sequence_id", "sequence_start", "sequence_end",
                               "binary_data_output", "headers"})
MAX_INDEX = 2**53  # global image indices (noise seeds) stay exact in JSON
MAX_TIMEOUT_S = 24 * 3600.0

_ERROR = re.compile(r"ditdeploy-error\[([A-Z_]+):([0-9a-f]*)\]")


class WireError(DitDeployError):
    """An error the server answers with: ``status`` is a Triton error code name."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status

    def encode(self) -> str:
        """The marker the Triton-side proxy recognises (hex, so no quoting or newline can break it)."""
        return f"ditdeploy-error[{self.status}:{' '.join(str(self).split()).encode().hex()}]"


def bad_request(message: str) -> WireError:
    return WireError("INVALID_ARG", message)


def busy(message: str) -> WireError:
    return WireError("UNAVAILABLE", message)


def decode_error(text: str) -> tuple[str, str] | None:
    """(status, message) from a proxied error text holding :meth:`WireError.encode`'s marker, else None."""
    m = _ERROR.search(text)
    return (m.group(1), bytes.fromhex(m.group(2)).decode("utf-8", "replace")) if m else None


@dataclass
class GenerateRequest:
    """One ``generate`` request: the labels of its images, where they sit in the global index order, a deadline,
    and the sampling settings as a :class:`SampleRequest` (output fields unused)."""

    labels: list[int | str]
    first_index: int = 0
    timeout_s: float | None = None
    sampling: SampleRequest = field(default_factory=lambda: SampleRequest(out=None))
    token: str | None = None  # the proxy's cancel token (server side only; never sent by clients)

    def by_name(self) -> bool:
        """Whether the labels travel as the ``class_names`` parameter (some are names) rather than INT64 ids."""
        return any(isinstance(v, str) for v in self.labels)

    def parameters(self) -> dict[str, Any]:
        """The KServe ``parameters`` object (JSON scalars only: the interval travels as "LO,HI")."""
        out: dict[str, Any] = {"first_index": self.first_index}
        if self.by_name():
            out["class_names"] = NAME_SEPARATOR.join(str(v) for v in self.labels)
        if self.timeout_s is not None:
            out["timeout_s"] = float(self.timeout_s)
        for name in WIRE_FIELDS:
            v = getattr(self.sampling, name)
            if v is None:
                continue
            out[name] = ",".join(str(int(p)) for p in v) if name == "cfg_interval" else v
        return out

    @classmethod
    def from_wire(cls, labels: Any, parameters: dict[str, Any] | None, max_images: int) -> GenerateRequest:
        """Parse and check a received request (``labels``: the INT64 tensor or None); every problem is a one-line
        :func:`bad_request`."""
        params = dict(parameters or {})
        token = params.pop(TOKEN_PARAMETER, None)
        if token is not None and not (isinstance(token, str) and token.isalnum() and len(token) <= 64):
            raise bad_request(f"{TOKEN_PARAMETER} is set by the server, not by clients")
        items = _labels(labels, params.get("class_names"), max_images)
        unknown = sorted(set(params) - set(WIRE_FIELDS) - set(EXTRA_FIELDS) - TRITON_PARAMETERS)
        if unknown:
            raise bad_request(f"unknown parameter(s) {', '.join(unknown)}: valid are "
                              f"{', '.join(WIRE_FIELDS + EXTRA_FIELDS)}")
        first = _int(params, "first_index", 0, 0, MAX_INDEX - len(items))
        timeout = _number(params, "timeout_s", None)
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT_S:
            raise bad_request(f"timeout_s must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {timeout}")
        kwargs: dict[str, Any] = {}
        types = {f.name: f.type for f in dataclasses.fields(SampleRequest)}
        for name in WIRE_FIELDS:
            if name not in params:
                continue
            kind = str(types[name])
            if name == "cfg_interval":
                kwargs[name] = _interval(params[name])
            elif kind.startswith("bool"):
                kwargs[name] = _bool(params, name)
            elif kind.startswith("int"):
                kwargs[name] = _int(params, name, None, None, None)
            elif kind.startswith("float"):
                kwargs[name] = _number(params, name, None)
            else:
                kwargs[name] = _str(params, name)
        sampling = SampleRequest(out=None, **kwargs)
        try:
            sampling.validate()
        except DitDeployError as e:
            raise bad_request(str(e)) from None
        return cls(labels=items, first_index=first, timeout_s=timeout, sampling=sampling, token=token)


def _labels(ids: Any, names: Any, max_images: int) -> list[int | str]:
    """Class ids (the ``labels`` tensor) or ids/names (the ``class_names`` parameter): exactly one of them."""
    if (ids is None) == (names is None):
        raise bad_request("pass the labels as the INT64 input 'labels' or as the parameter 'class_names', "
                          "exactly one of them")
    if ids is not None:
        seq: list[Any] = [int(v) for v in ids.reshape(-1)]
    else:
        if not isinstance(names, str) or len(names) > MAX_NAMES_CHARS:
            raise bad_request(f"class_names must be a string of at most {MAX_NAMES_CHARS} characters "
                              f"(names separated by '{NAME_SEPARATOR}')")
        seq = [s.strip() for s in names.split(NAME_SEPARATOR)]
        if any(not s for s in seq):
            raise bad_request(f"class_names has an empty name (names are separated by '{NAME_SEPARATOR}')")
        seq = [int(s) if s.isascii() and s.isdigit() else s for s in seq]
    if not seq:
        raise bad_request("labels is empty: name at least one class")
    if len(seq) > max_images:
        raise bad_request(f"{len(seq)} images in one request; this server takes at most {max_images} per request "
                          "(its --max-batch rows per denoiser call): split them over requests")
    return seq


def _int(params: dict[str, Any], name: str, default: int | None, lo: int | None, hi: int | None) -> Any:
    v = params.get(name, default)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad_request(f"{name} must be an integer, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad_request(f"{name} must be in {lo}..{hi}, got {v}")
    return v


def _number(params: dict[str, Any], name: str, default: float | None) -> float | None:
    v = params.get(name, default)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise bad_request(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _bool(params: dict[str, Any], name: str) -> bool:
    v = params[name]
    if not isinstance(v, bool):
        raise bad_request(f"{name} must be true or false, got {v!r}")
    return v


def _str(params: dict[str, Any], name: str) -> str:
    v = params[name]
    if not isinstance(v, str) or len(v) > 64:
        raise bad_request(f"{name} must be a short string, got {v!r}")
    return v


def _interval(v: Any) -> list[int] | None:
    from ditdeploy.diffusion import parse_cfg_interval

    if not isinstance(v, str):
        raise bad_request(f"cfg_interval must be a string 'LO,HI', got {v!r}")
    try:
        iv = parse_cfg_interval(v)
    except DitDeployError as e:
        raise bad_request(str(e)) from None
    return list(iv) if iv else None
