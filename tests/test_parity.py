"""ditdeploy.proof.parity (compare, the thresholds table, probe inputs) and ditdeploy.run.watched (the denoiser wrapper).

compare() is checked against an independent float64 computation written out here; the thresholds table is checked
to be the one every gate reads (check, export verification, INT8 quantization, OpenVINO conversion, AOTInductor).
"""

from __future__ import annotations

import numpy as np
import pytest

from ditdeploy.config.variants import DIGITS
from ditdeploy.errors import NumericsError
from ditdeploy.proof import parity
from ditdeploy.run.watched import NonFiniteError, Watched


def _independent(a: np.ndarray, r: np.ndarray) -> dict[str, float]:
    a64, r64 = a.astype(np.float64).ravel(), r.astype(np.float64).ravel()
    d = a64 - r64
    return {"rel_l2": float(np.sqrt(np.sum(d * d)) / np.sqrt(np.sum(r64 * r64))),
            "cosine": float(np.sum(a64 * r64) / np.sqrt(np.sum(a64 * a64) * np.sum(r64 * r64))),
            "max_abs": float(np.max(np.abs(d)))}


def test_compare_matches_an_independent_float64_computation():
    rng = np.random.default_rng(7)
    ref = rng.standard_normal((5, 2, 4, 4)).astype(np.float32)
    act = ref + 1e-3 * rng.standard_normal(ref.shape).astype(np.float32)
    act[3] += 0.05  # sample 3 is clearly the worst
    rep = parity.compare(act, ref)
    want = _independent(act, ref)
    assert rep.rel_l2 == pytest.approx(want["rel_l2"], rel=1e-12)
    assert rep.cosine == pytest.approx(want["cosine"], rel=1e-12)
    assert rep.max_abs == pytest.approx(want["max_abs"], rel=1e-12)
    assert rep.finite and rep.samples == 5 and rep.worst_sample == 3
    assert rep.worst_sample_rel_l2 == pytest.approx(_independent(act[3], ref[3])["rel_l2"], rel=1e-12)
    assert rep.metrics() == {"rel_l2": rep.rel_l2, "cosine": rep.cosine, "max_abs": rep.max_abs, "finite": True}


def test_compare_edge_cases():
    z = np.zeros((2, 3), np.float32)
    assert parity.compare(z, z).rel_l2 == 0.0 and parity.compare(z, z).cosine == 1.0
    bad = np.array([[1.0, np.nan]], np.float32)
    assert not parity.compare(bad, np.ones((1, 2), np.float32)).finite
    with pytest.raises(Exception, match="shape"):
        parity.compare(np.ones(3), np.ones(4))


def test_failures_name_the_gate():
    th = parity.thresholds_for("fp32")
    r = np.ones((2, 8), np.float32)
    assert parity.compare(r, r).failures(th) == []
    msgs = parity.compare(r * 1.01, r).failures(th, "at t=0")
    assert len(msgs) == 1 and msgs[0].startswith("rel-L2 0.01 > 0.0001 at t=0")


def test_one_thresholds_table_feeds_every_gate():
    from ditdeploy.calibration import quantize
    from ditdeploy.export import aoti, verify
    from ditdeploy.proof import reference_check

    assert reference_check.THRESHOLDS is parity.THRESHOLDS and reference_check.thresholds_for is parity.thresholds_for
    assert not hasattr(verify, "TOLERANCES")  # export verification asks parity.tolerance_for
    assert not hasattr(quantize, "MIN_COSINE")  # INT8 quantization judges by the int8 row (compare_runs)
    assert parity.THRESHOLDS["int8"].call_cosine == 0.99  # the one INT8 cosine limit
    assert not hasattr(aoti, "TOLERANCES")  # AOTInductor verification asks parity.tolerance_for too
    assert parity.tolerance_for("fp32") == {"rel_l2": 1e-4, "cosine": 0.99999}
    assert parity.thresholds_for("float16") is parity.THRESHOLDS["fp16"]
    for name, th in parity.THRESHOLDS.items():  # every row says why
        assert th.reason, name
    with pytest.raises(Exception, match="unknown precision"):
        parity.thresholds_for("fp4")


def test_lossiest_and_effective_precision():
    class Den:
        manifest = {"precision": "fp32"}
        name = "openvino:CPU:fp32->bf16"

    assert parity.effective_precision(Den()) == "bf16"
    assert parity.lossiest("int8", "f32") == "int8" and parity.lossiest("f16") == "fp16"


def test_probe_inputs_cover_both_cfg_halves_and_the_timestep_range():
    feeds = parity.probe_inputs(DIGITS, (1, 3, 2), seed=0)
    assert [f["x"].shape[0] for f in feeds] == [1, 3, 2]
    assert all(f["x"].dtype == np.float32 and f["t"].dtype == np.int64 for f in feeds)
    assert feeds[1]["y"][1] == DIGITS.null_class and feeds[2]["y"][1] == DIGITS.null_class
    ts = np.sort(np.concatenate([f["t"] for f in feeds]))
    assert ts[0] == 0 and ts[-1] == 999
    again = parity.probe_inputs(DIGITS, (1, 3, 2), seed=0)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(feeds, again, strict=True))  # seeded
    st = parity.stacked_probe_inputs(DIGITS, 16)
    assert st["x"].shape[0] == 16 and (st["y"][1::2] == DIGITS.null_class).all()
    dec = parity.decoder_probe_inputs(4, (8, 16), (2,), seed=0)
    assert [f["latents"].shape for f in dec] == [(2, 4, 8, 8), (2, 4, 16, 16)]


def test_watched_times_counts_and_watches_for_nan():
    def den(x, t, y):
        out = np.zeros_like(x)
        if int(t[0]) == 500:
            out[0, 0, 0, 0] = np.nan
        return out

    x = np.zeros((3, 1, 8, 8), np.float32)
    w = Watched(den, "tiny", finite=True)
    w(x, np.full(3, 10), np.zeros(3, np.int64))
    assert w.calls == 1 and w.rows == 3 and w.seconds >= 0.0
    with pytest.raises(NonFiniteError, match=r"tiny produced 1 NaN and 0 Inf of 192 values at call 2 .*t=500"):
        w(x, np.full(3, 500), np.zeros(3, np.int64))
    assert issubclass(NonFiniteError, NumericsError)
    plain = Watched(den)  # timing only: NaN passes through (the sampler's own check reports it)
    assert np.isnan(plain(x, np.full(3, 500), np.zeros(3, np.int64))).any() and plain.calls == 1

    from ditdeploy.runtimes import Timed

    assert Timed is Watched
