"""Signals as exceptions that unwind (every cleanup runs, temporary files are removed), and a record of them.

- SIGINT raises ``KeyboardInterrupt`` (exit 130); SIGTERM and SIGHUP raise :class:`Terminated` (exit 128 + signal
  number: 143, 129), a ``SystemExit`` so that library code catching ``Exception`` does not swallow it.
- Every handled signal is recorded (:func:`received`): an interrupt that a library turned into another error (a C
  extension's import reports a ``KeyboardInterrupt`` as ``ImportError``, which would read as a missing package) is
  still reported as the interruption it was.
- A signal that was ignored when the process started (``nohup``, a background shell's SIGINT) stays ignored.
- :func:`deferred` holds a signal back while a C extension is being imported: a ``KeyboardInterrupt`` raised in the
  middle of ``import onnx`` (protobuf descriptors half registered) made the interpreter crash at exit (SIGSEGV,
  measured: 2 of 12 SIGINT/SIGTERM runs of an early-interrupted export); the signal is raised as soon as the
  import is done.

Standard library only.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["HANDLED", "Terminated", "deferred", "describe", "exit_code", "install", "note_written", "received", "written"]

HANDLED = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)
_received: list[int] = []
_written: list[str] = []
_held: list[int] = []  # signals received inside deferred(), raised at its end
_defer_depth = 0


class Terminated(SystemExit):
    """SIGTERM / SIGHUP as an exception (exit code 128 + signal number)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.signum = int(signum)
        super().__init__(128 + self.signum)


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _on_signal(signum: int, frame: object) -> None:
    _received.append(signum)
    if _defer_depth:
        _held.append(signum)
        return
    _raise(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold the handled signals back inside the block (a C extension's import); the first one is raised at its
    end. Only the main thread's handlers defer; elsewhere this does nothing."""
    global _defer_depth
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
        if not _defer_depth and _held:
            signum = _held[0]
            _held.clear()
            _raise(signum)


def install() -> None:
    """Install the handlers (main thread only; signals ignored at start stay ignored) and forget earlier signals."""
    _received.clear()
    _written.clear()
    _held.clear()
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in HANDLED:
        cur = signal.getsignal(sig)
        default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        if cur is default or cur is _on_signal:
            signal.signal(sig, _on_signal)


def received() -> int | None:
    """The first signal handled since :func:`install`, or None."""
    return _received[0] if _received else None


def note_written(path: object) -> None:
    """Record an output that is complete at its final path (a signal after it reports it as written)."""
    _written.append(str(path))


def written() -> list[str]:
    """The outputs completed since :func:`install`."""
    return list(_written)


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + signal number (SIGINT 130, SIGTERM 143, SIGHUP 129)."""
    return 128 + int(signum)


def describe(signum: int) -> str:
    """The one-line error for a run stopped by ``signum``."""
    if signum == signal.SIGINT:
        return "interrupted"
    name = signal.Signals(signum).name
    return f"terminated ({name}{': the terminal hung up' if name == 'SIGHUP' else ''})"
