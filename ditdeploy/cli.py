"""The ``ditdeploy`` command line: thin wiring; each command lives in ``ditdeploy.commands.<name>``.

Command modules import only typer and the standard library at import time, so ``ditdeploy --help`` is fast and the
deploy commands never pull torch. Errors the user can fix are ``DitDeployError``: printed as one line, exit != 0;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from ditdeploy.commands import bench, calibrate, check, export, info, sample, train

app = typer.Typer(
    name="ditdeploy",
    help="Export DiT (Diffusion Transformers) to ONNX / TensorRT / OpenVINO, sample on any backend, prove parity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    if debug:
        os.environ["DITDEPLOY_DEBUG"] = "1"


for _mod in (train, export, calibrate, sample, check, bench, info):
    _mod.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and turn known errors into one clear line."""
    from ditdeploy.errors import DitDeployError

    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("DITDEPLOY_DEBUG") == "1"
    try:
        app(args=argv, standalone_mode=False)
    except SystemExit as e:
        raise e
    except DitDeployError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors and unexpected failures: still one line unless --debug
        import click

        if isinstance(e, click.exceptions.Abort):
            print("error: aborted", file=sys.stderr)
            sys.exit(1)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if debug:
            raise
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
