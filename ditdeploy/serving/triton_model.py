"""Triton-side proxy of every ``ditdeploy serve`` model (runs inside tritonserver's Python-backend stub).

PyTriton's own proxy is shipped beside this file as ``pytriton_model.py``; this subclass changes two things:
- errors: PyTriton turns any error of the inference function into a 500 whose body is a traceback. An error that
  carries a ``ditdeploy-error[STATUS:HEX]`` marker (``ditdeploy.serving.protocol.WireError``) is answered with that
  Triton status (INVALID_ARG -> HTTP 400, UNAVAILABLE -> 503) and its one-line reason, per request.
- start-up: every instance but the first waits only 1 s for the first one's handshake socket, which a loaded
  machine misses (the model then fails to load); here they wait for it up to ``HANDSHAKE_WAIT_S``.
Not imported by ditdeploy: ``server.py`` hands its bytes to PyTriton.
"""

import json
import pathlib
import re
import time

import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

from .pytriton_model import TritonPythonModel as _PyTritonModel  # type: ignore[import-not-found]

_ERROR = re.compile(r"ditdeploy-error\[([A-Z_]+):([0-9a-f]*)\]")
HANDSHAKE_WAIT_S = 120.0


class TritonPythonModel(_PyTritonModel):
    def initialize(self, args):
        if not str(args.get("model_instance_name", "")).endswith("_0"):
            config = json.loads(args["model_config"])
            workspace = pathlib.Path(config["parameters"]["workspace-path"]["string_value"])
            socket = workspace / f"{args['model_name']}-config.sock"
            deadline = time.monotonic() + HANDSHAKE_WAIT_S
            while not socket.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return super().initialize(args)

    def execute(self, requests):
        try:
            return super().execute(requests)
        except pb_utils.TritonModelException as e:
            m = _ERROR.search(str(e))
            if m is None:
                raise
            code = getattr(pb_utils.TritonError, m.group(1), pb_utils.TritonError.INTERNAL)
            message = bytes.fromhex(m.group(2)).decode("utf-8", "replace")
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)) for _ in requests]
