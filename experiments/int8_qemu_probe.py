"""ONNX Runtime's real int8 kernels on an AVX2-only CPU model, on any x86 machine: run under ``qemu-x86_64 -cpu
Haswell`` (Debian package qemu-user), whose CPUID reports AVX2/FMA and no AVX-512 or VNNI, so MLAS dispatches its
AVX2 u8s8 (``vpmaddubsw``) kernels. An experiment, not a test (7 minutes under TCG for 3 small models).

Step 1, under qemu and natively: ``python -m experiments.int8_qemu_probe run OUT.npz MODEL.onnx...`` runs each model
on 16 fixed digits inputs, with and without ONNX Runtime's ``session.x64quantprecision``:
``qemu-x86_64 -cpu Haswell .venv/bin/python -m experiments.int8_qemu_probe run haswell.npz digits.onnx q8.onnx q7.onnx``.
Step 2, natively: ``python -m experiments.int8_qemu_probe compare native.npz haswell.npz digits.onnx OUT.json``:
cosine / rel-L2 of every output vs the native fp32 output (the first model) and whether it equals the native run.
Recorded: ``bench/results/int8_qemu_haswell.json``.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from experiments.int8_saturation import probe_feeds

OPTION = "session.x64quantprecision"


def run(out: str, models: list[str]) -> None:
    import onnxruntime as ort

    feeds, res, t0 = probe_feeds(16), {}, time.time()
    for name in models:
        for opt in ("0", "1"):
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.intra_op_num_threads = 1
            if opt == "1":
                so.add_session_config_entry(OPTION, "1")
            sess = ort.InferenceSession(name, so, providers=["CPUExecutionProvider"])
            res[f"{name}|{OPTION}={opt}"] = sess.run(None, feeds)[0]
    np.savez(out, **res)
    print(f"{len(res)} outputs in {time.time() - t0:.1f} s", file=sys.stderr)


def compare(native: str, emulated: str, fp32: str, out: str) -> None:
    from ditdeploy.bench.machine import machine_info
    from ditdeploy.proof.distances import cosine, rel_l2

    nat, emu = np.load(native), np.load(emulated)
    ref = nat[f"{fp32}|{OPTION}=0"]
    rows = {}
    for where, d in (("native", nat), ("qemu -cpu Haswell", emu)):
        for k in d.files:
            rows[f"{where}: {k}"] = {"cosine_vs_fp32": cosine(d[k], ref), "rel_l2_vs_fp32": rel_l2(d[k], ref),
                                     "equals_native": bool(np.array_equal(d[k], nat[k]))}
    res = {"inputs": 16, "rows": rows, "machine": machine_info(), "reproduce": __doc__.split("Step 1", 1)[1].strip()}
    with open(out, "w") as f:
        f.write(json.dumps(res, indent=1, sort_keys=True) + "\n")
    for k, v in rows.items():
        print(f"{k:60s} cos {v['cosine_vs_fp32']:.6f} relL2 {v['rel_l2_vs_fp32']:.4f} =native {v['equals_native']}")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3:])
    else:
        compare(*sys.argv[2:6])
