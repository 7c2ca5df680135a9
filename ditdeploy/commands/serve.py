"""`ditdeploy serve`: Triton Inference Server (through PyTriton) with step-level batching across requests.

Flags -> :class:`ditdeploy.serving.core.ServeOptions` -> the server process (``ditdeploy.serving.server``), run by
the server environment's Python (``ditdeploy.serving.env``: PyTriton pins numpy<2, so it lives in `.venv-serve`):
this process is replaced by it (same PID, so signals reach the server directly). Typer + stdlib at import.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ditdeploy.commands import _common as c

PANEL_SERVER = "Server"


def register(app: typer.Typer) -> None:
    from ditdeploy.serving import options as d

    @app.command("serve")
    def serve(
        engine: Path = c.engine_option("Denoiser artifact to serve (.onnx, .xml, .plan/.engine, .pt2, "
                                       ".safetensors/.pt). Default: the shipped digits model."),
        backend: c.Backend = c.backend_option(),
        vae: Path = c.vae_option(),
        threads: int = c.threads_option(),
        provider: str = c.provider_option(),
        precision_hint: c.PrecisionHint = c.precision_hint_option(),
        device: str = typer.Option(None, "--device", help="torch backend: cpu | cuda; aoti: the .pt2's device.",
                                   rich_help_panel=c.PANEL_MODEL),
        trust_native_code: bool = c.trust_native_code_option(),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0: every interface).",
                                 rich_help_panel=PANEL_SERVER),
        port: int = typer.Option(d.DEFAULT_PORT, "--port", min=1, max=65535, help="HTTP port (KServe v2).",
                                 rich_help_panel=PANEL_SERVER),
        grpc_port: int = typer.Option(None, "--grpc-port", min=1, max=65535, help="gRPC port (default: --port "
                                      "+ 1).", rich_help_panel=PANEL_SERVER),
        metrics_port: int = typer.Option(None, "--metrics-port", min=1, max=65535, help="Prometheus metrics port "
                                         "(default: --port + 2).", rich_help_panel=PANEL_SERVER),
        max_batch: int = typer.Option(d.DEFAULT_MAX_BATCH, "--max-batch", min=1, max=4096, help="Rows per "
                                      "denoiser call (a guided step is 2 rows per image); also the most rows one "
                                      "request may need.", rich_help_panel=PANEL_SERVER),
        max_queue_delay_us: int = typer.Option(d.DEFAULT_QUEUE_DELAY_US, "--max-queue-delay-us", min=0,
                                               max=10_000_000, help="Longest wait for the rows of requests between "
                                               "two steps before a call runs smaller than --max-batch.",
                                               rich_help_panel=PANEL_SERVER),
        max_queue: int = typer.Option(d.DEFAULT_MAX_QUEUE, "--max-queue", min=1, max=256, help="Generate "
                                      "requests held at once (running or waiting for rows); more are refused "
                                      "with HTTP 503 at once.", rich_help_panel=PANEL_SERVER),
        request_timeout: float = typer.Option(d.DEFAULT_TIMEOUT_S, "--request-timeout", min=0.001, max=86400,
                                              help="Seconds a generate request may take; then its rows leave the "
                                              "batch and its slot is freed.", rich_help_panel=PANEL_SERVER),
        recipe: Path = typer.Option(None, "--recipe", help="A recipe from `ditdeploy tune`: its artifact, backend, "
                                    "threads and precision hint fill the flags not given (clients send its "
                                    "less-work settings: sample --server URL --recipe FILE).",
                                    rich_help_panel=c.PANEL_MODEL),
    ) -> None:
        """Serve a model on Triton Inference Server: `generate` (labels, seed, steps... -> images) with step-level
        batching across requests, `denoise` (the artifact's own x, t, y -> out) and `info`.

        Prints one ready line (HTTP, gRPC, metrics URLs); Ctrl-C / SIGTERM stop it cleanly. Clients:
        `ditdeploy sample --server http://HOST:PORT`, any KServe v2 / Triton client. See docs/serving.md.
        """
        import os
        import sys

        from ditdeploy.serving import env, server

        opts = d.ServeOptions(
            engine=engine, backend=c.value(backend), vae=vae, host=host, port=port, grpc_port=grpc_port,
            metrics_port=metrics_port, max_batch=max_batch, max_queue_delay_us=max_queue_delay_us,
            max_queue=max_queue, request_timeout_s=request_timeout,
            options={k: v for k, v in {"threads": threads, "providers": provider,
                                       "precision_hint": c.value(precision_hint),
                                       "device": device and device.lower(),
                                       "trust_native_code": trust_native_code or None}.items() if v is not None},
        )
        if recipe is not None:
            from ditdeploy.run.recipes import apply_recipe

            opts = apply_recipe(opts, recipe)
        opts.validate()
        if engine is not None and not engine.exists():
            from ditdeploy.errors import DitDeployError

            raise DitDeployError(f"no such file: {engine}")
        python = env.server_python()
        if Path(python) == Path(sys.executable):
            raise typer.Exit(server.main([opts.to_json()]))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(str(python), env.server_command(python, [opts.to_json()]), dict(os.environ))
