"""Per-call speed and accuracy of each INT8 form, interleaved on one machine (issue 24, deliverable 1).

Every candidate is a denoiser artifact on a runtime: ``LABEL=PATH@BACKEND`` with BACKEND ``onnxruntime`` (what
``ditdeploy sample`` runs: ``ditdeploy.runtimes.load``, which on a CPU without VNNI turns on ONNX Runtime's u8u8
kernels for full-range weights), ``onnxruntime-u8s8`` (a raw session without that switch: the fast kernels that
saturate on such CPUs), or ``openvino[:HINT]``. The first candidate is the reference (fp32). All are loaded at once,
called on the same batch in ``--rounds`` interleaved rounds after one warm-up call each (machine load hits every
candidate alike), and reported as median / min seconds per call, speed-up vs the reference, and cosine / rel-L2 vs the
reference's output. Run it under ``python -m experiments.cpu_mask --`` to measure what an AVX2-only CPU runs.

``python -m experiments.int8_forms --batch 2 --rounds 5 --out bench/results/int8_forms_xl2_avx2.json
fp32=xl2.onnx@onnxruntime int8-7bit=xl2-int8-avx2.onnx@onnxruntime ...``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _loader(path: Path, backend: str):
    from ditdeploy.runtimes import load

    name, _, hint = backend.partition(":")
    if name == "onnxruntime-u8s8":
        from ditdeploy.runtimes.base import physical_cores
        from ditdeploy.runtimes.onnxruntime import make_session

        sess = make_session(path, threads=physical_cores(), spinning=False, inter_op_threads=1, int8_exact=False)
        names = [i.name for i in sess.get_inputs()]
        return lambda x, t, y: sess.run(None, dict(zip(names, (x, t, y), strict=True)))[0]
    if name == "openvino":
        return load(path, backend="openvino", **({"precision_hint": hint} if hint else {}))
    return load(path, backend=name)


def measure(candidates: list[tuple[str, Path, str]], batch: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    from ditdeploy.artifact.manifest import Manifest
    from ditdeploy.proof.distances import cosine, rel_l2

    cfg = Manifest.load(candidates[0][1]).config
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
    t = np.linspace(50, 950, batch).round().astype(np.int64)
    y = (np.arange(batch) % cfg.num_classes).astype(np.int64)
    fns, rows = {}, {}
    for label, path, backend in candidates:
        t0 = time.perf_counter()
        fns[label] = _loader(path, backend)
        out = fns[label](x, t, y)  # warm-up (and the output compared)
        rows[label] = {"path": path.name, "backend": backend, "load_and_first_call_s": time.perf_counter() - t0,
                       "output": out, "times": []}
        print(f"{label}: loaded, first call {rows[label]['load_and_first_call_s']:.1f} s", file=sys.stderr)
    for r in range(rounds):
        for label in fns:
            t0 = time.perf_counter()
            fns[label](x, t, y)
            rows[label]["times"].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{rounds}", file=sys.stderr)
    ref_label = candidates[0][0]
    ref = rows[ref_label]["output"]
    ref_med = statistics.median(rows[ref_label]["times"])
    for row in rows.values():
        out = row.pop("output")
        row.update(median_s=statistics.median(row["times"]), min_s=min(row["times"]),
                   speedup_vs_ref=ref_med / statistics.median(row["times"]),
                   cosine_vs_ref=cosine(out, ref), rel_l2_vs_ref=rel_l2(out, ref))
    return {"batch": batch, "rounds": rounds, "reference": ref_label, "model": candidates[0][1].name, "rows": rows}


def _parse(spec: str) -> tuple[str, Path, str]:
    label, _, rest = spec.partition("=")
    path, _, backend = rest.rpartition("@")
    if not label or not path:
        raise SystemExit(f"bad candidate {spec!r}: use LABEL=PATH@BACKEND")
    return label, Path(path), backend or "onnxruntime"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.int8_forms", description=__doc__.split("\n\n")[0])
    ap.add_argument("candidates", nargs="+", help="LABEL=PATH@BACKEND; the first is the fp32 reference")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--note", default="")
    a = ap.parse_args(argv)
    from bench.machine import machine_info
    from ditdeploy.artifact.files import write_json_atomic
    from ditdeploy.artifact.output_policy import check_outputs
    from ditdeploy.errors import DitDeployError

    cands = [_parse(c) for c in a.candidates]
    try:
        check_outputs({"candidate": [p for _, p, _ in cands]}, {"--out": a.out})
        load_before = machine_info()["load_avg_1_5_15"]
        res = measure(cands, a.batch, a.rounds)
    except DitDeployError as e:
        raise SystemExit(f"error: {e}") from None
    res.update(machine=machine_info(), load_before=load_before, note=a.note,
               command="python -m experiments.int8_forms " + " ".join(sys.argv[1:] if argv is None else argv))
    write_json_atomic(a.out, res)
    for label, row in res["rows"].items():
        print(f"{label:28s} {row['backend']:22s} median {row['median_s']:.3f} s  x{row['speedup_vs_ref']:.2f}  "
              f"cos {row['cosine_vs_ref']:.6f}  relL2 {row['rel_l2_vs_ref']:.2e}")


if __name__ == "__main__":
    main()
