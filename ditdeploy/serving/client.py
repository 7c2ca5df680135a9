"""The client of ``ditdeploy serve`` (``sample --server URL``): KServe v2 over HTTP, standard library only.

:func:`server_info` asks the ``info`` model for the model's config, class names and limits; :func:`generate`
sends one ``generate`` request and returns its images (the response's tensors travel in Triton's binary-data
extension); :func:`sample_labels` runs a whole ``sample`` request's images as per-batch requests, a few in
flight at once, and returns them in global index order as a :class:`~ditdeploy.run.generation.SampleResult`.
No PyTriton, no tritonclient, no torch.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ditdeploy.errors import DitDeployError
from ditdeploy.run.generation import DEFAULT_BATCH, SampleRequest, SampleResult, Timings
from ditdeploy.serving.protocol import GenerateRequest

IN_FLIGHT = 4  # generate requests one `sample --server` keeps open at once
BUSY_RETRY_S = 60.0  # how long a 503 (server busy) is retried, with backoff
_DTYPES = {"UINT8": np.uint8, "INT64": np.int64, "FP32": np.float32, "INT32": np.int32}


class ServerError(DitDeployError):
    """The server answered with an error (``status``: the HTTP status) or could not be reached (status 0)."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(f"server {url}: {message}" + (f" (HTTP {status})" if status else ""))
        self.status = status


@dataclass
class ServerInfo:
    """What the ``info`` model says about the deployment (``generation`` reads ``config`` and ``decoder``)."""

    config: Any  # DiTConfig
    class_names: dict[int, str] | None
    decoder: str | None
    backend: str
    default_cfg_scale: float
    max_batch: int
    raw: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    def max_images(self, cfg_scale: float) -> int:
        """Images per request the server accepts at this guidance scale (its rows must fit one call)."""
        return max(1, self.max_batch // (2 if cfg_scale != 1.0 else 1))


def base_url(url: str) -> str:
    """``http://host:port`` from a ``--server`` value (a trailing slash is fine); anything else is an error."""
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme != "http" or not parsed.hostname or parsed.path not in ("", "/") or parsed.query:
        raise DitDeployError(f"--server {url!r}: expected http://HOST:PORT (the ready line of `ditdeploy serve`)")
    return f"http://{parsed.netloc}"


def _post(url: str, model: str, body: dict[str, Any], timeout: float) -> tuple[dict[str, Any], bytes]:
    """POST a KServe v2 inference request; returns (JSON header, binary tail). Errors are one line."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            n = resp.headers.get("Inference-Header-Content-Length")
    except urllib.error.HTTPError as e:
        text = e.read().decode("utf-8", "replace")
        try:
            msg = json.loads(text).get("error", text)
        except ValueError:
            msg = text
        raise ServerError(url, e.code, " ".join(str(msg).split())[:500]) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ServerError(url, 0, f"cannot reach the server ({reason}); is `ditdeploy serve` running?") from None
    split = int(n) if n is not None else len(raw)
    return json.loads(raw[:split]), raw[split:]


def _outputs(header: dict[str, Any], tail: bytes) -> dict[str, np.ndarray]:
    """Output tensors by name from a response (JSON ``data`` or binary-data extension)."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    for o in header.get("outputs", []):
        dtype = _DTYPES.get(o["datatype"])
        size = (o.get("parameters") or {}).get("binary_data_size")
        if o["datatype"] == "BYTES":
            out[o["name"]] = np.array(o["data"], dtype=object)
            continue
        if dtype is None:
            raise DitDeployError(f"server sent {o['name']} as {o['datatype']}, which this client does not read")
        if size is not None:
            arr = np.frombuffer(tail[offset: offset + size], dtype=dtype)
            offset += size
        else:
            arr = np.asarray(o["data"], dtype=dtype)
        out[o["name"]] = arr.reshape(o["shape"])
    return out


def server_info(url: str, timeout: float = 30.0) -> ServerInfo:
    """The deployment behind ``url`` (the ``info`` model)."""
    from ditdeploy.config.variants import DiTConfig

    url = base_url(url)
    header, _ = _post(url, "info", {"inputs": [{"name": "query", "datatype": "INT64", "shape": [1], "data": [0]}]},
                      timeout)
    d = json.loads(header["outputs"][0]["data"][0])
    names = {int(k): v for k, v in (d.get("class_names") or {}).items()} or None
    return ServerInfo(config=DiTConfig(**d["config"]), class_names=names, decoder=d.get("decoder"),
                      backend=str(d.get("backend")), default_cfg_scale=float(d["default_cfg_scale"]),
                      max_batch=int(d["max_batch"]), raw=d)


def generate(url: str, request: GenerateRequest, timeout: float = 660.0,
             busy_retry_s: float = BUSY_RETRY_S) -> tuple[np.ndarray, np.ndarray]:
    """One ``generate`` request: (images uint8 (n, H, W, C), labels int64 (n,)). A 503 (server busy) is retried
    with backoff for up to ``busy_retry_s`` seconds; any other error is a :class:`ServerError`."""
    out = generate_outputs(url, request, timeout, busy_retry_s)
    return out["images"], out["labels"]


def generate_outputs(url: str, request: GenerateRequest, timeout: float = 660.0, busy_retry_s: float = BUSY_RETRY_S,
                     outputs: tuple[str, ...] = ("images", "labels")) -> dict[str, np.ndarray]:
    """:func:`generate` returning the named ``outputs`` by name (``ditdeploy serve`` also answers
    ``admission_s``: seconds from admission to the first denoiser call holding the request's rows)."""
    url = base_url(url)
    ids = [] if request.by_name() else [{"name": "labels", "datatype": "INT64", "shape": [len(request.labels)],
                                         "data": [int(v) for v in request.labels]}]
    body = {"parameters": request.parameters(), "inputs": ids,
            "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in outputs]}
    give_up = time.monotonic() + busy_retry_s
    wait = 0.05
    while True:
        try:
            header, tail = _post(url, "generate", body, timeout)
            break
        except ServerError as e:
            if e.status != 503 or time.monotonic() + wait > give_up:
                raise
            time.sleep(wait)
            wait = min(2 * wait, 2.0)
    return _outputs(header, tail)


def sample_labels(req: SampleRequest, info: ServerInfo, all_labels: list[int]) -> SampleResult:
    """Every image of ``all_labels`` (global indices 0..n-1) from the server, in batches of ``req.batch_size``
    (capped to what one request may hold), ``IN_FLIGHT`` requests at once; the result in index order."""
    cfg_scale = req.cfg_scale if req.cfg_scale is not None else info.default_cfg_scale
    n = len(all_labels)
    bs = max(1, min(req.batch_size or DEFAULT_BATCH, info.max_images(cfg_scale), n))
    starts = list(range(0, n, bs))
    t0 = time.perf_counter()

    def one(start: int) -> tuple[np.ndarray, np.ndarray]:
        labels = all_labels[start: start + bs]
        return generate(req.server or "", GenerateRequest(labels=list(labels), first_index=start, sampling=req),
                        timeout=float(info.raw.get("request_timeout_s", 600.0)) + 60.0)

    with ThreadPoolExecutor(max_workers=max(1, min(IN_FLIGHT, len(starts)))) as pool:
        parts = list(pool.map(one, starts))
    images = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 1, 1, 1), np.uint8)
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0,), np.int64)
    if not np.array_equal(labels, np.asarray(all_labels, dtype=np.int64)):
        raise DitDeployError(f"server {req.server} answered with other labels than it was asked for")
    timings = Timings(denoiser_s=time.perf_counter() - t0, denoiser_calls=len(starts))  # the server's side
    return SampleResult(images=images, labels=labels, latents=None, indices=np.arange(n, dtype=np.int64),
                        backend=f"server {req.server} ({info.backend})", decoder=info.decoder, cfg_scale=cfg_scale,
                        shard=None, written=[], timings=timings, count=n)
