"""The ``ditdeploy`` command line: thin wiring; each command lives in ``ditdeploy.commands.<name>``.

Command modules import only typer and the standard library at import time, so ``ditdeploy --help`` is fast and the
deploy commands never pull torch. Errors the user can fix are ``DitDeployError``: printed as one line, exit != 0;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_APP: Any = None


def build_app() -> Any:
    """The typer app (built on first use, after the signal handlers are installed: importing typer and the command
    modules takes long enough on a slow machine for a Ctrl-C to land in it)."""
    global _APP
    if _APP is not None:
        return _APP
    import typer

    from ditdeploy.commands import bench, calibrate, check, export, fid, info, sample, serve, train, tune

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

    for mod in (train, export, calibrate, sample, serve, check, bench, tune, fid, info):
        mod.register(app)
    _compact_help_types()
    _APP = app
    return app


def _compact_help_types() -> None:
    """``--help`` at 80 columns: no type column entry for on/off flags (typer prints ``<bool>``), and ``<int>``
    instead of ``<int range>`` (the range is printed beside it). Skipped if typer's internals change."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover
        return
    orig = getattr(TyperOption, "display_type_rich", None)
    if orig is None or getattr(orig, "_ditdeploy", False):
        return

    def display_type_rich(self, ctx):  # type: ignore[no-untyped-def]
        if getattr(self, "is_flag", False):
            return None
        shown = orig(self, ctx)
        return shown.replace(" range>", ">") if isinstance(shown, str) else shown

    display_type_rich._ditdeploy = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich


def _ensure_std_streams() -> None:
    """Give a closed stdin/stdout/stderr (``2>&-``) a /dev/null, so a run does not fail on its log lines and no file
    opened later takes fd 1 or 2 (where a runtime's own log lines would then land inside an output)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name, fd, mode in (("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Python warnings (a library's UserWarning, a deprecation) as one ``warning:`` line, never source lines."""
    _say(f"warning: {_one_line(Warning(message) if not isinstance(message, Warning) else message, 300)}")


def _stopped(signum: int) -> None:
    from ditdeploy.system.interrupts import describe, exit_code, written

    done = [w for w in dict.fromkeys(written()) if os.path.lexists(w)]  # not the temporaries removed since
    _say(f"error: {describe(signum)}" + (f" (already written completely: {', '.join(done)})" if done else ""))
    sys.exit(exit_code(signum))


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr)
    except (OSError, ValueError):  # stderr went away (closed pipe): the exit code still tells
        pass


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and turn known errors into one clear line."""
    import signal

    from ditdeploy.system import interrupts

    interrupts.install()
    _ensure_std_streams()
    import warnings

    warnings.showwarning = _show_warning
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("DITDEPLOY_DEBUG") == "1"
    try:
        rv = build_app()(args=argv, standalone_mode=False)
    except interrupts.Terminated as e:
        _stopped(e.signum)
    except SystemExit as e:
        if e.code not in (0, None) and interrupts.received():
            _stopped(interrupts.received())
        raise e
    except KeyboardInterrupt:
        _stopped(signal.SIGINT)
    except BaseException as e:
        if interrupts.received() and not debug:  # a library reported the interruption as some other error
            _stopped(interrupts.received())
        _report(e, debug)
    # non-standalone typer turns Ctrl-C (and typer.Exit) into a returned exit code instead of raising
    if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
        if rv == 130:
            _stopped(interrupts.received() or signal.SIGINT)
        sys.exit(rv)


def _report(e: BaseException, debug: bool) -> None:
    """One line for an error (``--debug``: the traceback) and the exit code."""
    from ditdeploy.errors import DitDeployError

    if isinstance(e, DitDeployError):
        if debug:
            raise e
        _say(f"error: {_one_line(e)}")
        sys.exit(e.exit_code)
    if not isinstance(e, Exception):
        raise e
    # click usage errors and unexpected failures: still one line unless --debug
    # typer >= 0.20 vendors click (typer._click): match its exceptions by name and duck type, not click's classes
    names = {c.__name__ for c in type(e).__mro__}
    if "Abort" in names:
        _say("error: aborted")
        sys.exit(1)
    if "ClickException" in names and hasattr(e, "format_message"):
        msg = " ".join(str(e.format_message()).split())  # one line, e.g. "Invalid value for '--steps': ..."
        if msg:  # empty for "no arguments: help shown"
            _say(f"error: {msg} (see --help)")
        sys.exit(int(getattr(e, "exit_code", 2) or 2))
    if debug:
        raise e
    _say(f"error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)")
    sys.exit(1)


def _one_line(e: BaseException, limit: int = 1000) -> str:
    """The message of ``e`` on one line (embedded library messages can span several)."""
    msg = " ".join(str(e).split())
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


if __name__ == "__main__":  # pragma: no cover
    main()
