"""What an AVX2-only CPU computes for a dynamic INT8 artifact, emulated exactly on any CPU (issue 20).

ONNX Runtime's int8 GEMM on x86 without VNNI (MLAS u8s8 kernels, AVX2 and AVX-512BW) multiplies the raw uint8
activations by the int8 weights with ``vpmaddubsw``: each pair of adjacent products along K, a[2i]*w[2i] +
a[2i+1]*w[2i+1], is added into a signed 16-bit lane with saturation to [-32768, 32767]; ``vpmaddwd`` then sums the
lanes into int32 (no further saturation), and the activation zero point is corrected afterwards with exact column
sums of the weights. VNNI (``vpdpbusd``) adds the products into int32 directly.

:func:`emulate_avx2` rewrites every ``MatMulInteger`` (uint8 activations, constant int8 weights, zero weight zero
point: what ``quantize_int8(mode="dynamic")`` writes) into standard ONNX integer ops that compute exactly that: int32
products, pair sums, ``Clip`` to int16, sum, minus ``a_zp * colsum(W)``. The rewritten graph runs on ONNX Runtime
with integer arithmetic that is exact on every CPU, so this machine (VNNI) shows what an AVX2 one computes. It also
counts the saturated pairs per GEMM. With 7-bit weights (|w| <= 64) no pair can exceed 2 x 255 x 64 = 32640, so the
emulated graph equals the original bit for bit.

Run: ``python -m experiments.int8_saturation [--inputs 64]``: quantizes the shipped digits model for both forms
and writes ``bench/results/int8_avx2_emulation.json`` (cosine / rel-L2 vs fp32 with and without the emulation,
saturated pairs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

INT16 = (-32768, 32767)


def _const(name: str, arr: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(arr), name)


def emulate_avx2(model, saturate: bool = True) -> tuple[Any, list[str]]:
    """A copy of ``model`` whose ``MatMulInteger`` nodes compute the AVX2 u8s8 result (module doc); returns it and
    the names of the per-GEMM saturation-count outputs (int64 scalars) added to the graph. ``saturate=False``: the
    same integer ops without the int16 clip, i.e. the exact result (what VNNI/AMX compute) on any CPU."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes, counts = [], []
    bounds = INT16 if saturate else (np.iinfo(np.int32).min, np.iinfo(np.int32).max)
    lo, hi = _const("avx2_int16_min", np.array(bounds[0], np.int32)), _const("avx2_int16_max", np.array(bounds[1], np.int32))
    g.initializer.extend([lo, hi, _const("avx2_axis_pair", np.array([-2], np.int64))])
    for n in g.node:
        if n.op_type != "MatMulInteger":
            new_nodes.append(n)
            continue
        a, w_name, a_zp = n.input[0], n.input[1], n.input[2]
        w = numpy_helper.to_array(inits[w_name]).astype(np.int32)  # (K, N) int8 weights
        if len(n.input) > 3 and n.input[3]:
            wzp = numpy_helper.to_array(inits[n.input[3]])
            assert not np.any(wzp), f"{n.name}: nonzero weight zero point"
        k, nout = w.shape
        assert k % 2 == 0, f"{n.name}: odd K"
        p = f"avx2_{n.name or n.output[0]}"
        g.initializer.extend([
            _const(p + "_w", w.reshape(k // 2, 2, nout)),
            _const(p + "_colsum", w.sum(axis=0, dtype=np.int64).astype(np.int32)),
            _const(p + "_shape", np.array([0, 0, k // 2, 2, 1], np.int64)),
        ])
        out = n.output[0]
        new_nodes += [
            helper.make_node("Cast", [a], [p + "_a32"], to=onnx.TensorProto.INT32),
            helper.make_node("Reshape", [p + "_a32", p + "_shape"], [p + "_a5"]),  # (B, T, K/2, 2, 1)
            helper.make_node("Mul", [p + "_a5", p + "_w"], [p + "_prod"]),  # (B, T, K/2, 2, N)
            helper.make_node("ReduceSum", [p + "_prod", "avx2_axis_pair"], [p + "_pair"], keepdims=0),
            helper.make_node("Clip", [p + "_pair", lo.name, hi.name], [p + "_sat"]),  # vpmaddubsw: int16 lanes
            helper.make_node("Equal", [p + "_pair", p + "_sat"], [p + "_same"]),
            helper.make_node("Not", [p + "_same"], [p + "_clipped"]),
            helper.make_node("Cast", [p + "_clipped"], [p + "_c64"], to=onnx.TensorProto.INT64),
            helper.make_node("ReduceSum", [p + "_c64"], [p + "_count"], keepdims=0),
            helper.make_node("ReduceSum", [p + "_sat", "avx2_axis_pair"], [p + "_acc"], keepdims=0),  # vpmaddwd
            helper.make_node("Cast", [a_zp], [p + "_zp32"], to=onnx.TensorProto.INT32),
            helper.make_node("Mul", [p + "_zp32", p + "_colsum"], [p + "_corr"]),
            helper.make_node("Sub", [p + "_acc", p + "_corr"], [out]),
        ]
        counts.append(p + "_count")
        g.output.append(helper.make_tensor_value_info(p + "_count", onnx.TensorProto.INT64, []))
    del g.node[:]
    g.node.extend(new_nodes)
    return m, counts


def probe_feeds(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` denoiser inputs for the shipped digits model: x ~ N(0, 1), t spread over 0..999, labels incl. null."""
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 1, 8, 8)).astype(np.float32),
            "t": np.linspace(0, 999, n).round().astype(np.int64),
            "y": (np.arange(n) % 11).astype(np.int64)}


def run(path: Path, feeds: dict[str, np.ndarray], emulate: bool) -> tuple[np.ndarray, list[int]]:
    """Outputs of the graph at ``path`` (optionally AVX2-emulated) and its per-GEMM saturated-pair counts."""
    import onnx
    import onnxruntime as ort

    # both in exact integer ops (no MatMulInteger kernel of this CPU involved: without VNNI it would saturate too)
    model, counts = emulate_avx2(onnx.load(str(path)), saturate=emulate)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the integer ops as written
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs, sat = [], np.zeros(len(counts), np.int64)
    for i in range(0, feeds["x"].shape[0], 8):
        res = sess.run(["out", *counts], {k: v[i:i + 8] for k, v in feeds.items()})
        outs.append(res[0])
        sat += np.array([int(c) for c in res[1:]], np.int64)
    return np.concatenate(outs), [int(c) for c in sat]


def measure(src: Path, work: Path, n_inputs: int = 64) -> dict[str, Any]:
    """Quantize ``src`` (fp32 denoiser ONNX) for cpu-vnni and cpu-avx2, and compare each with fp32, as computed
    exactly (the same integer ops without the int16 clip: what VNNI/AMX compute, on any CPU) and as an AVX2 CPU computes it (emulated)."""
    from ditdeploy.calibration.quantize import quantize_int8
    from ditdeploy.proof.distances import cosine, rel_l2

    feeds = probe_feeds(n_inputs)
    ref, _ = run(src, feeds, emulate=False)
    res: dict[str, Any] = {"inputs": n_inputs, "model": src.name, "forms": {}}
    for target in ("cpu-vnni", "cpu-avx2"):
        q = work / f"{src.stem}-{target}.onnx"
        m = quantize_int8(src, q, None, mode="dynamic", target=target, progress=False, verify=False)
        exact, _ = run(q, feeds, emulate=False)
        avx2, sat = run(q, feeds, emulate=True)
        res["forms"][target] = {
            "weight_bits": m["int8"]["weight_bits"], "gemms": len(sat), "saturated_pairs": int(sum(sat)),
            "gemms_with_saturation": int(sum(1 for s in sat if s)),
            "exact": {"cosine": cosine(exact, ref), "rel_l2": rel_l2(exact, ref)},
            "avx2_emulated": {"cosine": cosine(avx2, ref), "rel_l2": rel_l2(avx2, ref)},
            "avx2_equals_exact": bool(np.array_equal(avx2, exact)),
        }
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results/int8_avx2_emulation.json"))
    a = ap.parse_args(argv)
    from ditdeploy.bench.machine import machine_info
    from ditdeploy.sources.shipped import DIGITS_ONNX as SHIPPED_ONNX

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "digits.onnx"
        for f in (SHIPPED_ONNX, SHIPPED_ONNX.with_name(SHIPPED_ONNX.name + ".json")):
            (Path(d) / f.name).write_bytes(f.read_bytes())
        res = measure(src, Path(d), a.inputs)
    res["machine"] = machine_info()
    res["reproduce"] = f"python -m experiments.int8_saturation --inputs {a.inputs}"
    a.out.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    json.dump(res["forms"], sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
