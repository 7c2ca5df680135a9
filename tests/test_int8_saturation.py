"""Proof of the INT8 form for CPUs without VNNI, independent of this machine's kernels (issue 20).

This machine has VNNI, so ONNX Runtime never saturates here. ``experiments.int8_saturation.emulate_avx2`` rewrites
a dynamic INT8 graph into exact integer ONNX ops that compute what an AVX2 CPU computes (pairs of u8 x s8 products
added into saturating int16 lanes). First the emulator itself is checked against plain numpy on a random GEMM; then,
on the shipped (trained) digits model: full-range int8 weights saturate in every quantized GEMM and fall to the
cosine the issue measured on an AMD Zen3 (0.997), while the 7-bit form chosen for such CPUs never saturates (the
emulated output equals the exact one bit for bit) and stays within the int8 gate.
"""

from __future__ import annotations

import numpy as np
import pytest

from ditdeploy.system.cpu_isa import detect

onnx = pytest.importorskip("onnx")
from experiments.int8_saturation import emulate_avx2, measure  # noqa: E402


def _numpy_avx2(a: np.ndarray, w: np.ndarray, a_zp: int) -> np.ndarray:
    """vpmaddubsw + vpmaddwd in numpy: pair sums of raw u8 x s8 products clipped to int16, summed in int32."""
    a32, w32 = a.astype(np.int64), w.astype(np.int64)
    pairs = a32[:, 0::2, None] * w32[None, 0::2, :] + a32[:, 1::2, None] * w32[None, 1::2, :]  # (M, K/2, N)
    return np.clip(pairs, -32768, 32767).sum(axis=1) - a_zp * w32.sum(axis=0)


def test_emulator_matches_numpy(tmp_path):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    m_, k, n = 6, 32, 5
    a = rng.integers(0, 256, (1, m_, k), dtype=np.uint8)
    a[0, 0] = 255  # a row that must saturate against large weights
    zp = np.array(131, np.uint8)
    for wmax in (127, 64):
        w = rng.integers(-wmax, wmax + 1, (k, n)).astype(np.int8)
        w[:, 0] = wmax
        g = helper.make_graph(
            [helper.make_node("MatMulInteger", ["a", "w", "zp", "wzp"], ["out"], name="mmi")], "g",
            [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, m_, k])],
            [helper.make_tensor_value_info("out", TensorProto.INT32, [1, m_, n])],
            [numpy_helper.from_array(w, "w"), numpy_helper.from_array(zp, "zp"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wzp")])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        em, counts = emulate_avx2(model)
        sess = ort.InferenceSession(em.SerializeToString(), providers=["CPUExecutionProvider"])
        out, cnt = sess.run(["out", *counts], {"a": a})
        ref = _numpy_avx2(a[0], w, int(zp))
        exact = (a[0].astype(np.int64) - int(zp)) @ w.astype(np.int64)
        np.testing.assert_array_equal(out[0], ref)
        if wmax == 127:
            assert int(cnt) > 0 and not np.array_equal(ref, exact)  # 2 x 255 x 127 > 32767
        else:
            assert int(cnt) == 0 and np.array_equal(ref, exact)  # 2 x 255 x 64 = 32640 fits


def test_full_range_weights_saturate_on_avx2_and_7bit_weights_do_not(tmp_path):
    from conftest import shipped_digits_copy

    from ditdeploy.proof.parity import THRESHOLDS

    res = measure(shipped_digits_copy(tmp_path), tmp_path, n_inputs=24)
    full, safe = res["forms"]["cpu-vnni"], res["forms"]["cpu-avx2"]
    where = f"emulated AVX2 on CPU {detect().label()}: {res['forms']}"
    # exact integer arithmetic (VNNI, or ORT's u8u8 kernels): both forms near fp32
    assert full["exact"]["cosine"] > 0.9999 and safe["exact"]["cosine"] > 0.9999, where
    # full-range int8 weights on an AVX2 CPU: most GEMMs saturate (15-16 of 16), ~0.3% cosine lost (issue 20 measured
    # 0.99702 on a Zen3; 64 inputs emulated: 0.99723), 10x the exact rel-L2
    assert full["gemms"] == 16 and full["gemms_with_saturation"] >= 12 and full["saturated_pairs"] > 1000, where
    assert full["avx2_emulated"]["cosine"] < 0.999 and full["avx2_emulated"]["rel_l2"] > 5 * full["exact"]["rel_l2"], where
    # 7-bit weights: no pair saturates, so an AVX2 CPU computes exactly what a VNNI CPU does
    assert safe["weight_bits"] == 7 and safe["saturated_pairs"] == 0 and safe["avx2_equals_exact"], where
    assert safe["avx2_emulated"]["cosine"] >= THRESHOLDS["int8"].call_cosine, where
