"""Run a command on this CPU as an AVX2-only CPU would run it, at native speed (``experiments/cpuid_mask.c``).

``python -m experiments.cpu_mask -- python -m experiments.h2h_diffusers ...`` builds the LD_PRELOAD library once
(gcc; cached under ``~/.cache/ditdeploy/cpuid_mask/`` by source hash), then runs the command with CPUID reporting
no AVX-512, no VNNI, no BF16/FP16 extensions and no AMX (AMD Zen3's instruction sets), so ONNX Runtime, OpenVINO and
torch dispatch their AVX2 kernels. It also sets ``DITDEPLOY_CPU_ISA`` to the same flags (ditdeploy's own decisions:
the INT8 form, the bf16 candidates) and ``DITDEPLOY_CPUID_MASK`` (recorded by ``bench.machine.machine_info`` as
``cpuid_mask``), so every result says it was measured masked. Needs Linux CPUID faulting (/proc/cpuinfo flag
``cpuid_fault``); without it the library refuses to run the command.

What this measures and what it does not: the AVX2 code paths on this machine's cores. An actual Zen3 has other
caches, ports and clocks, so absolute times differ; which kernel family a runtime picks and what it costs relative
to the others on the same core is what this shows. Verified by ``tests/test_cpu_mask.py``: ONNX Runtime's INT8 GEMMs
saturate exactly as on AVX2 hardware (full-range weights lose accuracy, 7-bit weights do not) and torch reports
``AVX2`` as its CPU capability.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cpuid_mask.c")
ENV_MASK = "DITDEPLOY_CPUID_MASK"
# What the masked CPU reports, in ditdeploy.system.cpu_isa names (AMD Zen3: AVX2, FMA, F16C; no AVX-512/VNNI/AMX).
AVX2_FLAGS = "avx2,fma,f16c"


def supported() -> bool:
    """True where the kernel offers CPUID faulting (x86 Linux, /proc/cpuinfo flag ``cpuid_fault``)."""
    from ditdeploy.system.cpu_isa import cpuinfo

    return "cpuid_fault" in cpuinfo().get("flags", "").split()


def build(cache: Path | None = None) -> Path:
    """Compile the library (once per source version) and return its path."""
    src = SOURCE.read_bytes()
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ditdeploy" / "cpuid_mask"
    out = cache / f"cpuid_mask-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if out.is_file():
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("cpu_mask: no C compiler (gcc) on PATH")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE), "-ldl"], check=True)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def masked_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this environment) with the library preloaded and the AVX2 flags named."""
    env = dict(os.environ if base is None else base)
    lib = str(build())
    env["LD_PRELOAD"] = lib + (f":{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else "")
    env["DITDEPLOY_CPU_ISA"] = AVX2_FLAGS
    env[ENV_MASK] = "avx2"
    return env


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.cpu_mask", description=__doc__.split("\n\n")[0])
    ap.add_argument("--stats", action="store_true", help="print how many CPUID instructions each process emulated")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command to run masked (after --)")
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("no command given: python -m experiments.cpu_mask -- COMMAND ...")
    if not supported():
        raise SystemExit("cpu_mask: this machine has no CPUID faulting (/proc/cpuinfo flag cpuid_fault)")
    env = masked_env()
    if a.stats:
        env["DITDEPLOY_CPUID_MASK_STATS"] = "1"
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main(sys.argv[1:])
