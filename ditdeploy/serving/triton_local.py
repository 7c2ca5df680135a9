"""Run a Triton model repository on the tritonserver that PyTriton bundles (Python backend only), on 127.0.0.1.

``export --fmt triton`` writes a repository for the NGC container; its Python-backend parts (``generate``, and the
``--model-config-name python`` variants of ``denoise`` / ``vae_decoder``: the artifact on ONNX Runtime) also run
here, on the server environment ``ditdeploy serve`` uses. PyTriton's binary is used directly: its Python-backend
stub is copied in for the environment's Python version, that Python's LIBDIR goes first on ``LD_LIBRARY_PATH`` (the
stub links ``libpython3.X.so`` without an RPATH), and ``DITDEPLOY_PYTHONPATH`` gives the stub's isolated interpreter
the environment's site-packages (numpy<2, which the stub needs; ditdeploy, installed there by README's install
line) and, after it, this process's.

:class:`LocalTriton` starts it in its own session, waits until it is ready, and stops it (SIGTERM, then SIGKILL)
with its workspace removed. Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ditdeploy.errors import DitDeployError

_PROBE = ("import json, pathlib, sys, sysconfig, pytriton; d = pathlib.Path(pytriton.__file__).parent; "
          "print(json.dumps({'pytriton': str(d), 'site': sysconfig.get_paths()['purelib'], "
          "'libdir': sysconfig.get_config_var('LIBDIR'), 'version': '%d.%d' % sys.version_info[:2]}))")


@dataclass(frozen=True)
class ServerEnv:
    """Where PyTriton's tritonserver and the Python it was installed for live."""

    pytriton: Path
    site: Path
    libdir: Path
    version: str

    @classmethod
    def probe(cls, python: str | os.PathLike | None = None) -> ServerEnv:
        """Ask ``python`` (default: the server environment of :func:`ditdeploy.serving.env.server_python`) where
        PyTriton's pieces are."""
        if python is None:
            from ditdeploy.serving.env import server_python

            python = server_python()
        try:
            out = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
            d = json.loads(out.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
            raise DitDeployError(f"{python}: no usable nvidia-pytriton there ({e}); install the server "
                                 "environment (README: Serving)") from e
        return cls(Path(d["pytriton"]), Path(d["site"]), Path(d["libdir"]), d["version"])

    @property
    def binary(self) -> Path:
        return self.pytriton / "tritonserver" / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.pytriton.parent / "nvidia_pytriton.libs"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalTriton:
    """``with LocalTriton(env, repo, config_name="python") as t: t.http`` -> ``http://127.0.0.1:PORT``."""

    def __init__(self, env: ServerEnv, repo: str | os.PathLike, *, config_name: str | None = "python",
                 ready_timeout: float = 180.0, log: str | os.PathLike | None = None):
        self.env, self.repo, self.config_name = env, Path(repo).resolve(), config_name
        self.ready_timeout, self.log_path = ready_timeout, log
        self.proc: subprocess.Popen | None = None
        self.workspace: Path | None = None
        self.ports = {k: free_port() for k in ("http", "grpc", "metrics")}

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    def _prepare(self) -> Path:
        ws = Path(tempfile.mkdtemp(prefix="ditdeploy-triton-"))
        src = self.env.pytriton / "tritonserver"
        shutil.copytree(src / "backends", ws / "backends")
        shutil.copytree(src / "caches", ws / "caches")
        stub = src / "python_backend_stubs" / self.env.version / "triton_python_backend_stub"
        if not stub.is_file():
            raise DitDeployError(f"PyTriton has no Python-backend stub for Python {self.env.version}")
        shutil.copy2(stub, ws / "backends" / "python" / stub.name)
        return ws

    def _environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(self.env.libdir), str(self.env.libs), *filter(None, [env.get("LD_LIBRARY_PATH")])])
        env["DITDEPLOY_PYTHONPATH"] = os.pathsep.join([str(self.env.site), sysconfig.get_paths()["purelib"]])
        return env

    def start(self) -> LocalTriton:
        self.workspace = self._prepare()
        p = self.ports
        cmd = [str(self.env.binary), f"--model-repository={self.repo}",
               f"--backend-directory={self.workspace / 'backends'}", f"--cache-directory={self.workspace / 'caches'}",
               "--http-address=127.0.0.1", f"--http-port={p['http']}", "--grpc-address=127.0.0.1",
               f"--grpc-port={p['grpc']}", "--metrics-address=127.0.0.1", f"--metrics-port={p['metrics']}",
               "--allow-cpu-metrics=true", "--exit-timeout-secs=5"]
        if self.config_name:
            cmd.append(f"--model-config-name={self.config_name}")
        log = open(self.log_path or self.workspace / "server.log", "ab")  # noqa: SIM115 (closed in stop)
        self._log = log
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._environ(),
                                     cwd=self.workspace, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise DitDeployError(f"tritonserver exited with {self.proc.returncode} before it was ready: {tail}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.http}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.3)
        self.stop()
        raise DitDeployError(f"tritonserver not ready after {self.ready_timeout:.0f} s")

    def log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError, AttributeError):
            self._log.flush()
            return Path(self._log.name).read_text(errors="replace")[-n:]
        return ""

    def stop(self) -> int | None:
        """Stop the server (SIGTERM, SIGKILL after 20 s) and remove its workspace; returns its exit code."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            rc = self.proc.returncode
        with contextlib.suppress(AttributeError, OSError):
            self._log.close()
        if self.workspace is not None:
            shutil.rmtree(self.workspace, ignore_errors=True)
        return rc

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
