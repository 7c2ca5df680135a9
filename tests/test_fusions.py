"""ORT CPU fusions of the exported denoiser (FastGelu, MultiHeadAttention): what is fused, and that the fused graph
computes what the unfused one does on ONNX Runtime CPU (two different kernels: fp32 rounding only, rel-L2 <= 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

from ditdeploy.export.ort_fusions import fuse_attention, ort_cpu_fusions  # noqa: E402
from ditdeploy.proof import distances  # noqa: E402

DEPTH = 4  # digits config
pytestmark = pytest.mark.filterwarnings("ignore:.*verification skipped:UserWarning")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from ditdeploy.export.onnx import export_denoiser_onnx
    from ditdeploy.export.randomize import random_model

    d = tmp_path_factory.mktemp("fuse")
    out = {}
    for prec in ("fp32", "fp16"):
        p = d / f"digits-{prec}.onnx"
        export_denoiser_onnx(random_model("digits", seed=3), p, precision=prec, verify=False, progress=False)
        out[prec] = p
    return out


def _run(model, feeds) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _feeds(n: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 1, 8, 8)).astype(np.float32), "t": np.array([0, 500, 999][:n]),
            "y": np.array([3, 10, 7][:n])}


def test_fused_graph_matches_unfused(exported):
    base = onnx.load(str(exported["fp32"]))
    fused, counts = ort_cpu_fusions(onnx.load(str(exported["fp32"])))
    assert counts == {"FastGelu": DEPTH, "FastGelu_with_bias": DEPTH, "MultiHeadAttention": DEPTH}
    ops = [n.op_type for n in fused.graph.node]
    assert "Softmax" not in ops and "Tanh" not in ops and ops.count("MultiHeadAttention") == DEPTH
    # only the patch-embedding (and unpatchify) transposes remain; the 3 per attention block are gone
    assert ops.count("Transpose") == [n.op_type for n in base.graph.node].count("Transpose") - 3 * DEPTH
    onnx.checker.check_model(fused)
    feeds = _feeds()
    ref, out = _run(base, feeds), _run(fused, feeds)
    assert distances.rel_l2(out, ref) < 1e-5 and distances.max_abs(out, ref) < 1e-4


def test_softmax_scale_is_read_from_the_graph(exported):
    """Change the export's q/k scaling constant: the fused graph must follow it (not assume 1/sqrt(head_dim))."""
    base = onnx.load(str(exported["fp32"]))
    scaled = {n.input[1] for n in base.graph.node if n.op_type == "Mul" and n.input[1].startswith("val_")}
    changed = 0
    for init in base.graph.initializer:
        if init.name in scaled and numpy_helper.to_array(init).size == 1:
            a = numpy_helper.to_array(init)
            if 0.1 < float(a.ravel()[0]) < 1.0:  # the sqrt(1/sqrt(head_dim)) factor applied to q and k
                init.CopyFrom(numpy_helper.from_array((a * 1.7).astype(a.dtype), init.name))
                changed += 1
    assert changed >= 1
    fused, n = fuse_attention(onnx.load_from_string(base.SerializeToString()))
    assert n == DEPTH
    feeds = _feeds()
    ref, out = _run(base, feeds), _run(fused, feeds)
    plain = _run(onnx.load(str(exported["fp32"])), feeds)
    assert distances.rel_l2(out, ref) < 1e-5
    assert distances.rel_l2(ref, plain) > 1e-3  # the change mattered


def test_fp16_and_foreign_graphs_are_left_alone(exported):
    m16 = onnx.load(str(exported["fp16"]))
    before = [n.op_type for n in m16.graph.node]
    out, n = fuse_attention(m16)
    assert n == 0 and [x.op_type for x in out.graph.node] == before
    # an attention core whose intermediate is also a graph output is not a plain core: untouched
    m = onnx.load(str(exported["fp32"]))
    sm = next(x for x in m.graph.node if x.op_type == "Softmax")
    m.graph.output.append(onnx.helper.make_tensor_value_info(sm.output[0], onnx.TensorProto.FLOAT, None))
    _, n = fuse_attention(m)
    assert n == DEPTH - 1
