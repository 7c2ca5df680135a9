"""Keep the calling thread's alternate signal stack across native calls that swap it (OpenVINO's CPU plugin).

Root cause of the SIGSEGV that killed long single-process test runs (and could kill any user process that uses
OpenVINO beside Python signal handlers): OpenVINO's CPU plugin (seen with 2026.4.1) installs its own
``sigaltstack`` on the thread that creates a plugin instance (``Core.compile_model``, ``get_property``) and puts back
the one it found when the instance is released. Two ``Core`` objects released out of creation order leave the
thread on the first instance's alternate stack after that stack was freed. Python installs its signal handlers
with ``SA_ONSTACK``, so the next signal with a Python-level handler (e.g. ``SIGCHLD``, which torch's DataLoader
handles, when a subprocess exits) makes the kernel build the signal frame on unmapped memory and kill the process
with SIGSEGV (``si_code`` SI_KERNEL, in a ``poll``/``wait4`` syscall; not even faulthandler can print). Reproduced
stand-alone: two Cores compiled, released A then B, one ``subprocess.run`` under a SIGCHLD handler -> exit 139.

``keep_sigaltstack()`` puts the thread's previous alternate stack back right after the plugin call, so every
instance records (and later restores) the interpreter's own stack, whatever the release order.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:  # pragma: no cover - no libc to talk to
        return None


_LIBC = _libc()


def current() -> tuple[int, int, int] | None:
    """(ss_sp, ss_flags, ss_size) of this thread's alternate signal stack; None where it cannot be read."""
    if _LIBC is None:
        return None
    s = _StackT()
    if _LIBC.sigaltstack(None, ctypes.byref(s)) != 0:
        return None
    return (s.ss_sp or 0, s.ss_flags, s.ss_size)


@contextlib.contextmanager
def keep_sigaltstack() -> Iterator[None]:
    """Run the block, then restore this thread's alternate signal stack if the block changed it (Linux only)."""
    if _LIBC is None:
        yield
        return
    old = _StackT()
    ok = _LIBC.sigaltstack(None, ctypes.byref(old)) == 0
    try:
        yield
    finally:
        if ok:
            now = current()
            if now is not None and now != (old.ss_sp or 0, old.ss_flags, old.ss_size):
                _LIBC.sigaltstack(ctypes.byref(old), None)
