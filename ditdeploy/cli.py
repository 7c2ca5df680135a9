"""The ``ditdeploy`` command line: thin wiring; each command lives in ``ditdeploy.commands.<name>``.

Command modules import only typer and the standard library at import time, so ``ditdeploy --help`` is fast and the
deploy commands never pull torch. Errors the user can fix are ``DitDeployError``: printed as one line, exit != 0;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from ditdeploy.commands import bench, calibrate, check, export, fid, info, sample, train

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


for _mod in (train, export, calibrate, sample, check, bench, fid, info):
    _mod.register(app)


class Terminated(SystemExit):
    """SIGTERM as an exception (exit code 143): unwinding runs every cleanup, so no temp file is left behind."""

    def __init__(self) -> None:
        super().__init__(143)


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and turn known errors into one clear line."""
    import signal
    import threading

    from ditdeploy.errors import DitDeployError

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("DITDEPLOY_DEBUG") == "1"
    try:
        rv = app(args=argv, standalone_mode=False)
        # non-standalone typer turns Ctrl-C (and typer.Exit) into a returned exit code instead of raising
        if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
            if rv == 130:
                print("error: interrupted", file=sys.stderr)
            sys.exit(rv)
    except Terminated:
        print("error: terminated", file=sys.stderr)
        sys.exit(143)
    except SystemExit as e:
        raise e
    except DitDeployError as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors and unexpected failures: still one line unless --debug
        # typer >= 0.20 vendors click (typer._click): match its exceptions by name and duck type, not click's classes
        names = {c.__name__ for c in type(e).__mro__}
        if "Abort" in names:
            print("error: aborted", file=sys.stderr)
            sys.exit(1)
        if "ClickException" in names and hasattr(e, "format_message"):
            msg = " ".join(str(e.format_message()).split())  # one line, e.g. "Invalid value for '--steps': ..."
            if msg:  # empty for "no arguments: help shown"
                print(f"error: {msg} (see --help)", file=sys.stderr)
            sys.exit(int(getattr(e, "exit_code", 2) or 2))
        if debug:
            raise
        print(f"error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


def _one_line(e: BaseException, limit: int = 1000) -> str:
    """The message of ``e`` on one line (embedded library messages can span several)."""
    msg = " ".join(str(e).split())
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


if __name__ == "__main__":  # pragma: no cover
    main()
