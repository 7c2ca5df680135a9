"""ONNX Runtime CPU graph fusions for the exported DiT denoiser (``com.microsoft`` contrib ops: ORT only).

Once the GEMMs run in INT8 the elementwise passes around them are a large share of a CPU call. Two rewrites, both
numerically equivalent to fp32 rounding and applied to the fp32 graph before quantization (they work on a graph
loaded without its weights):

- ``fuse_fast_gelu``: the dynamo export spells GELU(tanh) as eight elementwise ops (Pow, Mul, Add, Tanh, ...) over
  the widest activation of each block -> ``FastGelu`` (with fc1's bias add folded in).
- ``fuse_attention``: the attention core of each block -- qkv ``Reshape (B, N, 3, H, Dh)`` -> ``Transpose
  [2,0,3,1,4]`` -> q/k/v slices -> scaled ``QK^T`` -> ``Softmax`` -> ``AV`` -> ``Transpose [0,2,1,3]`` ->
  ``Reshape (B, N, D)`` (about 25 nodes, 5 of them full-tensor transposes/copies) -> one ``Split`` of the qkv
  activation and ``MultiHeadAttention`` (ORT's fused CPU kernel; the softmax scale read from the graph).

The result runs on ONNX Runtime only, not on TensorRT or OpenVINO (those fuse attention and GELU themselves).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np

__all__ = ["fuse_attention", "fuse_fast_gelu", "ort_cpu_fusions"]


@contextlib.contextmanager
def quiet_ort_logging():
    """ORT's quantization / transformer tools warn on the root logger: silence it below ERROR for a block."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(old)


def _ensure_ms_domain(model: Any) -> None:
    import onnx

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def fuse_fast_gelu(model: Any) -> tuple[Any, dict[str, int]]:
    """tanh-GELU -> ``FastGelu`` (fc1's bias folded in). Returns the model and the fusion counts."""
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts the fusion modules on the import path)
    from onnxruntime.transformers.fusion_biasgelu import FusionBiasGelu
    from onnxruntime.transformers.fusion_fastgelu import FusionFastGelu
    from onnxruntime.transformers.onnx_model import OnnxModel

    om = OnnxModel(model)
    with quiet_ort_logging():
        FusionFastGelu(om).apply()
        n_gelu = sum(n.op_type == "FastGelu" for n in om.model.graph.node)
        FusionBiasGelu(om, True).apply()
        om.prune_graph()
        om.topological_sort()  # the fusions append their nodes at the end
    n_bias = sum(n.op_type == "FastGelu" and len(n.input) > 1 for n in om.model.graph.node)
    if n_gelu:
        _ensure_ms_domain(om.model)
    return om.model, {"FastGelu": n_gelu, "FastGelu_with_bias": n_bias}


def _perm(node: Any) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def _const(name: str, inits: dict[str, Any], consts: dict[str, Any]) -> np.ndarray | None:
    from onnx import numpy_helper

    if name in inits:
        return numpy_helper.to_array(inits[name])
    if name in consts:
        return consts[name]
    return None


def _shape_tail(name: str, inits: dict[str, Any], consts: dict[str, Any], producer: dict[str, Any]
                ) -> list[int] | None:
    """The trailing constant entries of a Reshape's shape input: a constant, or a Concat whose last inputs are."""
    c = _const(name, inits, consts)
    if c is not None:
        return [int(v) for v in c.ravel()]
    node = producer.get(name)
    if node is None or node.op_type != "Concat":
        return None
    tail: list[int] = []
    for i in reversed(node.input):
        v = _const(i, inits, consts)
        if v is None:
            break
        tail[0:0] = [int(x) for x in v.ravel()]
    return tail or None


def _attention_core(start: Any, consumers: dict[str, list[Any]], outputs: set[str]) -> tuple[list[Any], Any] | None:
    """Nodes from the qkv ``Transpose [2,0,3,1,4]`` to the ``Reshape`` after ``Transpose [0,2,1,3]`` (inclusive)."""
    core = [start]
    seen = {id(start)}
    stack = list(start.output)
    final = None
    while stack:
        name = stack.pop()
        if name in outputs:
            return None
        for c in consumers.get(name, []):
            if id(c) in seen:
                continue
            seen.add(id(c))
            core.append(c)
            if c.op_type == "Transpose" and _perm(c) == [0, 2, 1, 3]:
                nxt = consumers.get(c.output[0], [])
                if final is not None or len(nxt) != 1 or nxt[0].op_type != "Reshape":
                    return None
                final = nxt[0]
                core.append(final)
                continue
            stack.extend(c.output)
            if len(core) > 64:  # not the small attention core
                return None
    if final is None:
        return None
    return core, final


def fuse_attention(model: Any) -> tuple[Any, int]:
    """Replace each block's attention core by ``Split`` + ``com.microsoft.MultiHeadAttention``; returns the count.

    A core is rewritten only when it has the exact shape of the DiT export (one Softmax, two MatMuls, heads and head
    size from the qkv Reshape constant, no value used outside it); anything else is left as it is. fp16 graphs are
    left alone (the ORT CPU kernel is fp32).
    """
    import onnx

    g = model.graph
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in g.initializer):
        return model, 0
    ctx = _GraphIndex(g)
    remove: set[int] = set()
    added: list[Any] = []
    for n in list(g.node):
        match = _match_attention(n, ctx)
        if match is None:
            continue
        rs, core, final, heads, scale = match
        i = len(added) // 2
        added.extend(_mha_nodes(model, rs.input[0], final.output[0], i, heads, scale))
        remove.update({id(c) for c in core} | {id(rs)})
    if not added:
        return model, 0
    _splice(g, added, remove, ctx.producer)
    _drop_dead(g, ctx.graph_outputs)
    _ensure_ms_domain(model)
    return model, len(added) // 2


class _GraphIndex:
    """Lookups over one graph: initializers, Constant values, producer and consumers of every value."""

    def __init__(self, g: Any) -> None:
        from onnx import numpy_helper

        self.inits = {i.name: i for i in g.initializer}
        self.consts = {n.output[0]: numpy_helper.to_array(a.t) for n in g.node if n.op_type == "Constant"
                       for a in n.attribute if a.name == "value"}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.graph_outputs = {o.name for o in g.output}


def _match_attention(n: Any, ctx: _GraphIndex) -> tuple[Any, list[Any], Any, int, float] | None:
    """(qkv Reshape, core nodes, final node, heads, softmax scale) if ``n`` starts a plain DiT attention core."""
    if n.op_type != "Transpose" or _perm(n) != [2, 0, 3, 1, 4]:
        return None
    rs = ctx.producer.get(n.input[0])
    if rs is None or rs.op_type != "Reshape" or len(ctx.consumers.get(rs.output[0], [])) != 1:
        return None
    tail = _shape_tail(rs.input[1], ctx.inits, ctx.consts, ctx.producer)
    if tail is None or len(tail) < 3 or int(tail[-3]) != 3 or min(int(tail[-2]), int(tail[-1])) < 1:
        return None
    heads, head_dim = int(tail[-2]), int(tail[-1])
    found = _attention_core(n, ctx.consumers, ctx.graph_outputs)
    if found is None:
        return None
    core, final = found
    ops = [c.op_type for c in core]
    if ops.count("Softmax") != 1 or ops.count("MatMul") + ops.count("FusedMatMul") != 2:
        return None
    core_ids = {id(c) for c in core}
    produced = {o for c in core for o in c.output}
    if any(c2 is not None and id(c2) not in core_ids
           for o in produced - {final.output[0]} for c2 in ctx.consumers.get(o, [])):
        return None  # an intermediate is used elsewhere: not a plain attention core
    scale = _softmax_scale(core, ctx, head_dim)
    return None if scale is None else (rs, core, final, heads, scale)


def _softmax_scale(core: list[Any], ctx: _GraphIndex, head_dim: int) -> float | None:
    """The product of the scalar constants the core multiplies by (the export scales q and k by sqrt(scale) each);
    none -> the SDPA default 1/sqrt(head_dim); a non-constant Mul/Div -> None (not fusable)."""
    scale = 1.0
    n_scale = 0
    for c in core:
        if c.op_type in ("Mul", "Div"):
            k = next((v for v in (_const(i, ctx.inits, ctx.consts) for i in c.input) if v is not None and v.size == 1),
                     None)
            if k is None:
                return None
            kv = float(k.ravel()[0])
            scale *= kv if c.op_type == "Mul" else 1.0 / kv
            n_scale += 1
    return scale if n_scale else 1.0 / float(np.sqrt(head_dim))


def _mha_nodes(model: Any, qkv: str, out: str, i: int, heads: int, scale: float) -> list[Any]:
    """``Split`` of the packed qkv activation + ``com.microsoft.MultiHeadAttention`` writing ``out``."""
    from onnx import helper

    q, k, v = (f"ddattn{i}_{s}" for s in "qkv")
    return [helper.make_node("Split", [qkv], [q, k, v], name=f"ddattn{i}_split", axis=-1,
                             **({"num_outputs": 3} if _opset(model) >= 18 else {})),
            helper.make_node("MultiHeadAttention", [q, k, v], [out], name=f"ddattn{i}",
                             domain="com.microsoft", num_heads=heads, scale=scale)]


def _splice(g: Any, added: list[Any], remove: set[int], producer: dict[str, Any]) -> None:
    """Drop the removed nodes; put each Split + MHA pair right after its qkv producer (stays topologically sorted)."""
    by_src = {a.input[0]: (a, b) for a, b in zip(added[::2], added[1::2], strict=True)}
    ordered = [pair_node for pair in by_src.values() if pair[0].input[0] not in producer for pair_node in pair]
    for n in g.node:
        if id(n) in remove:
            continue
        ordered.append(n)
        for o in n.output:
            if o in by_src:
                ordered.extend(by_src[o])
    g.ClearField("node")
    g.node.extend(ordered)


def _drop_dead(g: Any, graph_outputs: set[str]) -> None:
    """Remove nodes none of whose outputs is used (the cores' shape arithmetic) and unused initializers."""
    while True:
        used = {i for n in g.node for i in n.input} | graph_outputs
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    for i in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(i)


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def ort_cpu_fusions(model: Any) -> tuple[Any, dict[str, int]]:
    """FastGelu and MultiHeadAttention fusions; returns the model and the fusion counts."""
    model, counts = fuse_fast_gelu(model)
    model, counts["MultiHeadAttention"] = fuse_attention(model)
    return model, counts
