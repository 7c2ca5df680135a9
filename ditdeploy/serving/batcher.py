"""Step-level batching: one thread owns a model and runs the rows of every waiting caller in one call.

Each ``generate`` request runs the ordinary sampler (``ditdeploy.diffusion.sample``, unchanged) in its own thread
over a :class:`BatchedDenoiser`; every denoiser evaluation of that sampler becomes a *submission* here and the
thread blocks until its rows come back. The worker takes the oldest submission, adds every other waiting one of
the same kind (plain / full / light call under feature reuse) while the rows fit ``max_rows``, runs one call and
hands each caller its slice. Requests at different steps (different ``t`` per row) therefore share a call, and a
new request's first step joins the next call. Before a call the worker waits (at most ``max_delay_s``) for the
requests it knows are between two steps (open sessions, :meth:`RowBatcher.session`, without a pending
submission), so a cohort does not split into half-size calls because the worker was quicker than their threads.
A call that raises is retried per submission, so one bad submission fails alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ditdeploy.serving.protocol import WireError


class Stopped(WireError):
    """The server is stopping: pending work is refused."""

    def __init__(self) -> None:
        super().__init__("UNAVAILABLE", "the server is stopping")


class Cancelled(WireError):
    """The client cancelled the request (or its gRPC connection went away): its slot is freed."""

    def __init__(self) -> None:
        super().__init__("CANCELLED", "the client cancelled the request")


class DeadlineExceeded(WireError):
    """A request passed its ``timeout_s``: its rows leave the batch and its slot is freed."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__("UNAVAILABLE", f"request exceeded its timeout_s={timeout_s:g} s and was dropped")


@dataclass
class _Job:
    kind: str
    arrays: tuple[np.ndarray, ...]
    rows: int
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    started: float | None = None  # time.monotonic() when the call holding these rows began


@dataclass
class Counters:
    """What the worker did: calls, rows, the largest call, calls that mixed several timesteps (``t`` column)."""

    calls: int = 0
    rows: int = 0
    max_rows: int = 0
    mixed_calls: int = 0
    submissions: int = 0
    busy_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "rows": self.rows, "max_rows": self.max_rows, "mixed_calls": self.mixed_calls,
                "submissions": self.submissions, "busy_s": round(self.busy_s, 6),
                "mean_rows": round(self.rows / self.calls, 4) if self.calls else 0.0}


class RowBatcher:
    """Runs ``fns[kind](*arrays)`` for the concatenated rows of waiting submissions of one kind, ``max_rows`` at
    most per call (a single larger submission runs alone). ``max_delay_s``: the longest the worker waits for the
    open sessions' next rows when a call would be smaller than ``max_rows`` (0: never waits)."""

    def __init__(self, fns: dict[str, Callable[..., Any]], max_rows: int, max_delay_s: float = 0.0,
                 name: str = "batcher"):
        self.fns = fns
        self.max_rows = max(1, int(max_rows))
        self.max_delay_s = max(0.0, float(max_delay_s))
        self.counters = Counters()
        self._queue: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._sessions = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def run(self, kind: str, *arrays: np.ndarray, started: list[float] | None = None) -> Any:
        """Submit rows and wait for their output (an array, or a tuple of arrays for kinds that return several).
        ``started``: a list that receives the ``time.monotonic()`` at which the call holding the rows began."""
        job = _Job(kind, tuple(arrays), int(arrays[0].shape[0]))
        with self._cv:
            if self._closed:
                raise Stopped()
            self._queue.append(job)
            self.counters.submissions += 1
            self._cv.notify_all()
        job.done.wait()
        if started is not None and job.started is not None:
            started.append(job.started)
        if job.error is not None:
            raise job.error
        return job.result

    def session(self) -> _Session:
        """A context for one request's sequence of submissions (the worker waits for open sessions' rows)."""
        return _Session(self)

    def _open(self, delta: int) -> None:
        with self._cv:
            self._sessions += delta
            self._cv.notify_all()

    def close(self) -> None:
        """Stop the worker; waiting and later submissions get :class:`Stopped`."""
        with self._cv:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for job in pending:
            job.error = Stopped()
            job.done.set()
        self._thread.join(timeout=60)

    def _take(self) -> list[_Job] | None:
        """The next call's submissions (oldest first, same kind, within max_rows); None when closed."""
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            if self.max_delay_s and self._rows_ready() < self.max_rows:
                deadline = time.monotonic() + self.max_delay_s
                while (self._rows_ready() < self.max_rows and len(self._queue) < self._sessions
                       and not self._closed):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            kind = self._queue[0].kind
            taken: list[_Job] = []
            rows = 0
            for job in list(self._queue):
                if job.kind != kind:
                    continue
                if taken and rows + job.rows > self.max_rows:
                    break
                taken.append(job)
                rows += job.rows
            for job in taken:
                self._queue.remove(job)
            return taken

    def _rows_ready(self) -> int:
        kind = self._queue[0].kind
        return sum(j.rows for j in self._queue if j.kind == kind)

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            t0 = time.perf_counter()
            began = time.monotonic()
            for job in jobs:
                job.started = began
            try:
                self._call(jobs)
            except BaseException as e:  # noqa: BLE001 - every failure goes to its submissions, the worker lives on
                self._retry_alone(jobs, e)
            self._count(jobs, time.perf_counter() - t0)  # before the callers resume: they may read the counters
            for job in jobs:
                job.done.set()

    def _call(self, jobs: list[_Job]) -> None:
        fn = self.fns[jobs[0].kind]
        if len(jobs) == 1:
            jobs[0].result = fn(*jobs[0].arrays)
            return
        joined = [np.concatenate(parts) for parts in zip(*(j.arrays for j in jobs), strict=True)]
        out = fn(*joined)
        bounds = np.cumsum([0] + [j.rows for j in jobs])
        for j, lo, hi in zip(jobs, bounds[:-1], bounds[1:], strict=True):
            j.result = tuple(o[lo:hi] for o in out) if isinstance(out, tuple) else out[lo:hi]

    def _retry_alone(self, jobs: list[_Job], err: BaseException) -> None:
        if len(jobs) == 1:
            jobs[0].error = err
            return
        for job in jobs:
            try:
                self._call([job])
            except BaseException as e:  # noqa: BLE001
                job.error = e

    def _count(self, jobs: list[_Job], seconds: float) -> None:
        rows = sum(j.rows for j in jobs)
        c = self.counters
        c.calls += 1
        c.rows += rows
        c.max_rows = max(c.max_rows, rows)
        c.busy_s += seconds
        ts = [j.arrays[1] for j in jobs if len(j.arrays) > 1 and j.arrays[1].ndim >= 1]
        if ts and np.unique(np.concatenate([t.reshape(-1) for t in ts])).size > 1:
            c.mixed_calls += 1


class _Session:
    def __init__(self, batcher: RowBatcher):
        self.batcher = batcher

    def __enter__(self) -> _Session:
        self.batcher._open(1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.batcher._open(-1)


class BatchedDenoiser:
    """A denoiser for one request's sampler whose calls go through ``batcher`` (same attributes as ``den``).

    ``deadline``: a ``time.monotonic()`` value after which the next call raises :class:`DeadlineExceeded` (the
    request's rows leave the batch). ``cancelled``: an Event (the server stopping) that raises :class:`Stopped`;
    ``cancel_file``: a path whose existence (the Triton-side proxy saw the client cancel) raises
    :class:`Cancelled`."""

    def __init__(self, batcher: RowBatcher, den: Any, deadline: float | None = None, timeout_s: float | None = None,
                 cancelled: threading.Event | None = None, cancel_file: Any = None):
        self.batcher = batcher
        self.config = den.config
        self.name = den.name
        self.supports_cache = bool(getattr(den, "supports_cache", False))
        self.deadline, self.timeout_s, self.cancelled, self.cancel_file = deadline, timeout_s, cancelled, cancel_file
        self.calls = 0
        self.first_call_at: float | None = None  # time.monotonic() when the first call with this request's rows began

    def _check(self) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise Stopped()
        if self.cancel_file is not None and self.cancel_file.exists():
            raise Cancelled()
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded(self.timeout_s or 0.0)
        self.calls += 1

    def _run(self, kind: str, *arrays: np.ndarray) -> Any:
        self._check()
        if self.first_call_at is not None:
            return self.batcher.run(kind, *arrays)
        began: list[float] = []
        try:
            return self.batcher.run(kind, *arrays, started=began)
        finally:
            self.first_call_at = began[0] if began else None

    def __call__(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self._run("plain", x, t, y)

    def forward_full(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._run("full", x, t, y)

    def forward_light(self, x: np.ndarray, t: np.ndarray, y: np.ndarray, cache: np.ndarray) -> np.ndarray:
        return self._run("light", x, t, y, cache)
