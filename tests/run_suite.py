"""Run the default test suite with every test file in its own pytest process, then print one total line.

Why: on the 2-core CI machine, one long pytest process running all ~470 tests died with SIGSEGV about 14 minutes in
(always right after the training/ImageFolder tests, whatever test came next); every file passes on its own. Until
the cause is found, isolating files keeps one module's process state (DataLoader workers, ONNX Runtime/OpenVINO
thread pools, forkservers) from taking the whole run down. Extra arguments are passed to every pytest run
(e.g. ``-m slow``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("passed", "failed", "skipped", "error", "errors", "deselected", "xfailed", "xpassed")


def main(argv: list[str]) -> int:
    files = sorted(p for p in (ROOT / "tests").glob("test_*.py"))
    totals = dict.fromkeys(KINDS, 0)
    bad: list[str] = []
    t0 = time.time()
    for f in files:
        rel = f.relative_to(ROOT)
        t = time.time()
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(rel), *argv],
                           cwd=ROOT, capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        for n, kind in re.findall(r"(\d+) (" + "|".join(KINDS) + r")\b", last):
            totals[kind] += int(n)
        print(f"{rel}: {last.strip('= ') or 'no output'} (rc {p.returncode}, {time.time() - t:.0f} s)", flush=True)
        if p.returncode not in (0, 5):  # 5 = nothing collected (e.g. every test deselected)
            bad.append(str(rel))
            print(p.stdout[-8000:] + p.stderr[-3000:], flush=True)
    failed = totals["failed"] + totals["error"] + totals["errors"] + (len(bad) if not totals["failed"] else 0)
    print(f"{len(files)} files in {time.time() - t0:.0f} s; failing files: {', '.join(bad) or 'none'}")
    print(f"suite: {totals['passed']} passed, {failed} failed, {totals['skipped']} skipped")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
