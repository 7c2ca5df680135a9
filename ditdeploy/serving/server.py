"""The server process: Triton Inference Server serving the ``generate``, ``denoise`` and ``info`` models.

The server is PyTriton's bundled tritonserver; all three models are served from one
:class:`~ditdeploy.serving.core.ServingCore`.

``python -m ditdeploy.serving.server OPTIONS_JSON`` (``ditdeploy serve`` starts it, in the server environment:
``ditdeploy/serving/env.py``). Prints one ready line on stdout; SIGINT / SIGTERM stop tritonserver (and its
Python-backend stubs), the batchers and the runtime, remove the workspace, and exit 130 / 143. Errors before
ready are one ``error:`` line, exit 2 (1 for a runtime failure).

Concurrency: Triton hands a model instance one request at a time when the model is not decoupled (and Triton's
HTTP endpoint refuses decoupled models), so ``generate`` gets ``max_queue + 1`` instances: ``max_queue``
admitted requests plus one that answers the next with 503 at once. ``denoise`` gets a few instances; its rows
go through the same batcher as generate's steps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from ditdeploy.errors import DitDeployError
from ditdeploy.serving.core import ServingCore
from ditdeploy.serving.env import libpython_first
from ditdeploy.serving.options import ServeOptions
from ditdeploy.serving.protocol import WireError

MODELS = ("generate", "denoise", "info")
DENOISE_INSTANCES = 4
# tritonserver unloads the Python-backend models one by one (2-7 s each on a loaded 2-core box) and only an unload
# removes a stub's shared memory (/dev/shm) and model folder (/tmp/folderXXXXXX); cut short, stubs can even outlive
# it (seen: a stub hung in futex_wait, deaf to SIGTERM). So Triton gets this long, and _reap cleans up after it.
EXIT_TIMEOUT_S = 30
_PROXY = Path(__file__).with_name("triton_model.py")


def _wire(e: BaseException) -> Exception:
    """An exception whose text carries the WireError marker (PyTriton forwards the exception's repr)."""
    if isinstance(e, WireError):
        return RuntimeError(e.encode())
    if isinstance(e, DitDeployError):
        return RuntimeError(WireError("INTERNAL", str(e)).encode())
    return RuntimeError(WireError("INTERNAL", f"{type(e).__name__}: {e}").encode())


def _use_proxy_with_status_codes() -> None:
    """Ship ``triton_model.py`` as each model's ``model.py`` (PyTriton's own proxy beside it as
    ``pytriton_model.py``) so that our errors get their HTTP status and one-line reason."""
    from pytriton.models import model as pm

    if getattr(pm.Model.get_proxy_model_files, "_ditdeploy", False):
        return
    original = pm.Model.get_proxy_model_files

    def get_proxy_model_files(self: Any) -> dict[str, bytes]:
        files = original(self)
        key = f"file:{self.model_version}/model.py"
        files[f"file:{self.model_version}/pytriton_model.py"] = files[key]
        files[key] = _PROXY.read_bytes()
        return files

    get_proxy_model_files._ditdeploy = True  # type: ignore[attr-defined]
    pm.Model.get_proxy_model_files = get_proxy_model_files


def bind(triton: Any, core: ServingCore) -> None:
    """The three models on ``triton`` (a started-or-not ``pytriton.triton.Triton``)."""
    import numpy as np
    from pytriton.model_config import ModelConfig, Tensor

    cfg = core.den.config
    loop_pool = core.pool

    async def generate(requests: list[Any]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        out = []
        for r in requests:
            try:
                req = core.admit(r.data.get("labels"), r.parameters)
            except BaseException as e:  # noqa: BLE001
                raise _wire(e) from None
            try:
                out.append(await loop.run_in_executor(loop_pool, core.run, req))
            except BaseException as e:  # noqa: BLE001
                raise _wire(e) from None
        return out

    async def denoise(requests: list[Any]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        out = []
        for r in requests:
            x = r["x"]
            if x.shape[0] > core.opts.max_batch:
                raise _wire(WireError("INVALID_ARG", f"{x.shape[0]} rows in one denoise request; this server takes "
                                                     f"at most --max-batch {core.opts.max_batch}"))
            try:
                res = await loop.run_in_executor(None, core.denoise, x, r["t"], r["y"])
            except BaseException as e:  # noqa: BLE001
                raise _wire(e) from None
            out.append({"out": res})
        return out

    async def info(requests: list[Any]) -> list[dict[str, Any]]:
        import json

        text = json.dumps(core.info()).encode()
        return [{"info": np.array([text], dtype=np.object_)} for _ in requests]

    one = ModelConfig(batching=False)
    triton.bind("generate", [generate] * (core.opts.max_queue + 1),
                inputs=[Tensor(name="labels", dtype=np.int64, shape=(-1,), optional=True)],
                outputs=[Tensor(name="images", dtype=np.uint8, shape=(-1, -1, -1, -1)),
                         Tensor(name="labels", dtype=np.int64, shape=(-1,)),
                         Tensor(name="admission_s", dtype=np.float32, shape=(1,))], config=one, strict=True)
    triton.bind("denoise", [denoise] * max(1, min(DENOISE_INSTANCES, core.opts.max_queue)),
                inputs=[Tensor(name="x", dtype=np.float32, shape=(-1, cfg.in_channels, cfg.input_size,
                                                                   cfg.input_size)),
                        Tensor(name="t", dtype=np.int64, shape=(-1,)), Tensor(name="y", dtype=np.int64, shape=(-1,))],
                outputs=[Tensor(name="out", dtype=np.float32, shape=(-1, cfg.out_channels, cfg.input_size,
                                                                     cfg.input_size))], config=one, strict=True)
    triton.bind("info", info, inputs=[Tensor(name="query", dtype=np.int64, shape=(1,))],
                outputs=[Tensor(name="info", dtype=np.bytes_, shape=(1,))], config=one)


def ready_line(opts: ServeOptions) -> str:
    http, grpc, metrics = opts.ports()
    h = opts.host
    return (f"ready: http://{h}:{http} (KServe v2: models {', '.join(MODELS)}) | grpc {h}:{grpc} | "
            f"metrics http://{h}:{metrics}/metrics")


def serve(opts: ServeOptions, stop: threading.Event, say: Any = print, warn: Any = None) -> None:
    """Load, start Triton, print the ready line, block until ``stop`` is set, clean up.

    tritonserver 2.51 can die under a request (its HTTP frontend segfaults parsing a JSON BYTES input of 10^6
    elements, before any model sees it); then it is started again on the same ports with the same loaded model
    (one ``warn`` line, a new ready line), and only the requests in flight at that moment fail."""
    opts.validate()
    os.environ.update(libpython_first())  # before tritonserver starts: its stubs inherit it
    for name in ("pytriton", "sh"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warn = warn or (lambda s: print(s, file=sys.stderr, flush=True))
    _use_proxy_with_status_codes()
    workdir = Path(tempfile.mkdtemp(prefix="ditdeploy-serve-"))
    core = None
    try:
        core = ServingCore(opts)
        restarts = 0
        while not stop.is_set():
            if not _run_triton(opts, core, workdir / f"run{restarts}", stop, say):
                return
            restarts += 1
            warn(f"warning: tritonserver stopped unexpectedly; starting it again (restart {restarts})")
    finally:
        if core is not None:
            core.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _run_triton(opts: ServeOptions, core: ServingCore, workdir: Path, stop: threading.Event, say: Any) -> bool:
    """One tritonserver lifetime; True when it died on its own (start it again), False when ``stop`` ended it."""
    from pytriton.triton import Triton, TritonConfig

    workdir.mkdir(parents=True)
    http, grpc, metrics = opts.ports()
    config = TritonConfig(
        http_address=opts.host, http_port=http, grpc_address=opts.host, grpc_port=grpc,
        metrics_address=opts.host, metrics_port=metrics, allow_gpu_metrics=False, log_verbose=0,
        log_file=workdir / "tritonserver.log", exit_timeout_secs=EXIT_TIMEOUT_S, http_thread_count=max(8, opts.max_queue + 4),
    )
    triton = Triton(config=config, workspace=workdir / "pytriton")
    cancel_dir = (workdir / "pytriton").resolve() / "cancelled"  # the proxy's marks (triton_model.py)
    cancel_dir.mkdir()
    core.cancel_dir = cancel_dir
    stubs: list[Any] = []
    try:
        bind(triton, core)
        triton.run()
        stubs = _stubs()
        if not stop.is_set():
            say(ready_line(opts))
        while not stop.wait(0.5):
            if not triton.is_alive():
                return True
        return False
    finally:
        if stop.is_set():  # in-flight requests end now ("the server is stopping"), not after PyTriton's 20 s wait
            core.close()
        triton.stop()
        _reap(stubs)
        shutil.rmtree(workdir, ignore_errors=True)


def _stubs() -> list[tuple[Any, list[str]]]:
    """tritonserver's Python-backend stub processes (children of this process's tritonserver) with their argv."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if argv and argv[0].endswith("triton_python_backend_stub"):
            out.append((child, argv))
    return out


def _reap(stubs: list[tuple[Any, list[str]]]) -> None:
    """After tritonserver stopped: kill a stub that outlived it, remove what an unload would have removed (the
    stub's model folder under the temp dir, its /dev/shm region) and this process's PyTriton shm regions."""
    import glob

    import psutil

    alive = [p for p, _ in stubs if p.is_running()]
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)
    tmp = Path(tempfile.gettempdir()).resolve()
    for _, argv in stubs:
        model = Path(argv[1]) if len(argv) > 2 else None
        if model is not None and model.name == "model.py" and model.parent.parent.name.startswith("folder") and \
                model.parent.parent.parent in (tmp, Path("/tmp")):
            shutil.rmtree(model.parent.parent, ignore_errors=True)
        if len(argv) > 2 and argv[2].startswith("pytrtion") and "/" not in argv[2]:
            Path("/dev/shm", argv[2]).unlink(missing_ok=True)
    for region in glob.glob(f"/dev/shm/pytrtion{os.getpid()}-*"):
        Path(region).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m ditdeploy.serving.server OPTIONS_JSON``; returns the exit code."""
    stop = threading.Event()
    got: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        got.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 1:
            raise DitDeployError("usage: python -m ditdeploy.serving.server OPTIONS_JSON (internal: ditdeploy serve)")
        serve(ServeOptions.from_json(args[0]), stop, say=lambda s: print(s, flush=True))
    except DitDeployError as e:
        if not got:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            return e.exit_code
    except Exception as e:  # a runtime's or PyTriton's own failure: still one line
        if not got:
            print(f"error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            return 1
    if got:
        return 128 + got[0]
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
