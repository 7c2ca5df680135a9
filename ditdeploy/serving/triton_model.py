"""Triton-side proxy of every ``ditdeploy serve`` model (runs inside tritonserver's Python-backend stub).

PyTriton's own proxy is shipped beside this file as ``pytriton_model.py``; this subclass changes three things:
- errors: PyTriton turns any error of the inference function into a 500 whose body is a traceback. An error that
  carries a ``ditdeploy-error[STATUS:HEX]`` marker (``ditdeploy.serving.protocol.WireError``) is answered with that
  Triton status (INVALID_ARG -> HTTP 400, UNAVAILABLE -> 503) and its one-line reason, per request.
- start-up: every instance but the first waits only 1 s for the first one's handshake socket, which a loaded
  machine misses (the model then fails to load); here they wait for it up to ``HANDSHAKE_WAIT_S``.
- cancellation: Triton marks a request cancelled when its gRPC client cancels or goes away (its HTTP endpoint
  does not), but PyTriton never asks. Each request gets a token parameter (``ditdeploy_token``); while it runs, a
  watcher polls ``is_cancelled()`` and creates ``<workspace>/cancelled/<token>``, which the server's request
  thread checks before each denoiser step (its rows leave the batch, its slot is freed).
Not imported by ditdeploy: ``server.py`` hands its bytes to PyTriton.
"""

import json
import pathlib
import re
import threading
import time
import uuid

import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

from . import pytriton_model as _pm  # type: ignore[import-not-found]

_PyTritonModel = _pm.TritonPythonModel
_ERROR = re.compile(r"ditdeploy-error\[([A-Z_]+):([0-9a-f]*)\]")
HANDSHAKE_WAIT_S = 120.0
TOKEN_PARAMETER = "ditdeploy_token"
POLL_S = 0.1
_TOKENS: dict = {}  # id(triton request) -> token, while its execute runs


def _wrap_request_with_token(wrap):
    def wrapped(self, triton_request, inputs, span=None):
        request = wrap(self, triton_request, inputs, span)
        token = _TOKENS.get(id(triton_request))
        if token is not None:
            request.parameters = {**(request.parameters or {}), TOKEN_PARAMETER: token}
        return request

    return wrapped


_pm.TritonRequestsServer._wrap_request = _wrap_request_with_token(_pm.TritonRequestsServer._wrap_request)


class _Watcher:
    """Polls the requests of one execute for cancellation until it returns."""

    def __init__(self, requests, cancel_dir):
        self.items = [(r, uuid.uuid4().hex) for r in requests]
        for r, token in self.items:
            _TOKENS[id(r)] = token
        self.cancel_dir = cancel_dir
        self.done = threading.Event()
        self.thread = None
        if cancel_dir is not None and all(hasattr(r, "is_cancelled") for r, _ in self.items):
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self):
        pending = list(self.items)
        while pending and not self.done.wait(POLL_S):
            for item in list(pending):
                if item[0].is_cancelled():
                    (self.cancel_dir / item[1]).touch()
                    pending.remove(item)

    def stop(self):
        self.done.set()
        if self.thread is not None:
            self.thread.join()
        for r, _ in self.items:
            _TOKENS.pop(id(r), None)


class TritonPythonModel(_PyTritonModel):
    def initialize(self, args):
        config = json.loads(args["model_config"])
        workspace = pathlib.Path(config["parameters"]["workspace-path"]["string_value"])
        self._cancel_dir = workspace / "cancelled" if (workspace / "cancelled").is_dir() else None
        if not str(args.get("model_instance_name", "")).endswith("_0"):
            socket = workspace / f"{args['model_name']}-config.sock"
            deadline = time.monotonic() + HANDSHAKE_WAIT_S
            while not socket.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return super().initialize(args)

    def execute(self, requests):
        watcher = _Watcher(requests, self._cancel_dir)
        try:
            return super().execute(requests)
        except pb_utils.TritonModelException as e:
            m = _ERROR.search(str(e))
            if m is None:
                raise
            code = getattr(pb_utils.TritonError, m.group(1), pb_utils.TritonError.INTERNAL)
            message = bytes.fromhex(m.group(2)).decode("utf-8", "replace")
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)) for _ in requests]
        finally:
            watcher.stop()
