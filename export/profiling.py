"""Peak memory of an export: a sampling thread for per-stage peaks and the process's lifetime peak.
"""

from __future__ import annotations

import resource
import threading
from typing import Any


class PeakRSS:
    """Context manager sampling this process's resident set size; ``.peak`` bytes over the window."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._lap_peak = 0
        self.stages: dict[str, int] = {}
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss
            self.peak = max(self.peak, rss)
            self._lap_peak = max(self._lap_peak, rss)
            self._stop.wait(self.interval)

    def lap(self, name: str) -> None:
        """Record the peak since the previous lap under ``name``."""
        rss = self._proc.memory_info().rss
        self.stages[name] = max(self._lap_peak, rss)
        self.peak = max(self.peak, rss)
        self._lap_peak = rss

    def __enter__(self) -> PeakRSS:
        import psutil  # imported here, in the caller's thread: an import inside the sampler thread can deadlock
        # on the module lock when Ctrl-C interrupts the main thread mid-import

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, self._proc.memory_info().rss)


def process_peak_rss() -> int:
    """Lifetime peak RSS of this process in bytes (ru_maxrss; Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _stage_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="stage", leave=False)
