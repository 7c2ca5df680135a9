"""Static TensorRT-readiness check of an ONNX graph: no GPU, no TensorRT (``ditdeploy check --trt-lint x.onnx``).

Checked against the TensorRT ONNX parser's published operator support list (``trt_ops.json``, see
:mod:`ditdeploy.export.trt_ops` for its source release) and the rules of strongly typed networks:

- every node: standard ONNX domain, op supported, the data type of its first input among the listed types, the
  hand-encoded restrictions (constant ``axes`` inputs, attribute values, LayerNormalization with one output, ...);
  the model's ONNX opset within the documented range;
- Q/DQ (explicit quantization, strongly typed): int8 (or FP8 E4M3) quantized type given by an explicit zero point
  that is a constant 0; scales constant, finite and > 0; the scale's float type equal to the data's type (an fp16
  scale only where the data is fp16: in a strongly typed network the DQ output takes the scale's type);
- notes (not violations): int64 graph inputs (TensorRT 10 takes them natively; ditdeploy feeds int64 t / y).

Violations make :func:`lint_onnx`'s report fail; ``ditdeploy`` prints it and exits 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.errors import ArtifactError, DitDeployError, require
from ditdeploy.export.trt_ops import load_ops

__all__ = ["Finding", "LintError", "LintReport", "check_graph", "lint_model", "lint_onnx"]

STANDARD_DOMAINS = ("", "ai.onnx")
QDQ = ("QuantizeLinear", "DequantizeLinear")
QUANTIZED_TYPES = ("INT8", "FLOAT8E4M3FN")
FLOAT_TYPES = ("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE")


class LintError(DitDeployError):
    """The graph breaks a TensorRT rule (exit 1, like a failed check)."""

    exit_code = 1


@dataclass(frozen=True)
class Finding:
    rule: str
    node: str
    op: str
    message: str

    def line(self) -> str:
        where = f"{self.op} {self.node!r}" if self.node else "graph"
        return f"[{self.rule}] {where}: {self.message}"


@dataclass
class LintReport:
    path: str
    source: dict[str, Any]
    nodes: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)
    violations: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "passed": self.passed, "nodes": self.nodes, "op_counts": self.op_counts,
                "violations": [f.__dict__ for f in self.violations], "notes": self.notes,
                "support_list": self.source}

    def format(self, limit: int = 40) -> str:
        src = self.source
        head = (f"TensorRT lint of {self.path}: {self.nodes} nodes, {len(self.op_counts)} op types; against "
                f"onnx-tensorrt {src.get('branch')} ({str(src.get('commit'))[:10]}) docs/operators.md")
        lines = [head]
        lines += [f"  violation {f.line()}" for f in self.violations[:limit]]
        if len(self.violations) > limit:
            lines.append(f"  ... {len(self.violations) - limit} more violations")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  PASS: no violations" if self.passed else f"  FAIL: {len(self.violations)} violation(s)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- graph facts


class _Graph:
    """Constants (initializers, Constant nodes), inferred element types and consumers of one ONNX graph."""

    def __init__(self, model: Any, base_dir: str):
        from onnx import TensorProto, shape_inference

        self.tp = TensorProto
        self.base_dir = base_dir
        self.inits = {i.name: i for i in model.graph.initializer}
        self.const_nodes = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and n.output}
        try:
            inferred = shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # a graph shape inference cannot read: types then come from declared values only
            inferred = model
        self.types: dict[str, str] = {}
        g = inferred.graph
        for v in [*g.input, *g.output, *g.value_info]:
            et = v.type.tensor_type.elem_type
            if et:
                self.types[v.name] = TensorProto.DataType.Name(et)
        for name, t in self.inits.items():
            self.types[name] = TensorProto.DataType.Name(t.data_type)
        for name, n in self.const_nodes.items():
            for a in n.attribute:
                if a.name == "value":
                    self.types[name] = TensorProto.DataType.Name(a.t.data_type)
        self.consumers: dict[str, list[Any]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.producer = {o: n for n in model.graph.node for o in n.output}

    def is_const(self, name: str) -> bool:
        return name in self.inits or name in self.const_nodes

    def value(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name], base_dir=self.base_dir)
        n = self.const_nodes.get(name)
        if n is not None:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


# --------------------------------------------------------------------------------------------- node rules


def _node_findings(node: Any, g: _Graph, ops: dict[str, Any]) -> list[Finding]:
    """Domain, support, first-input type and the encoded restrictions of one node."""
    name, op = node.name, node.op_type
    f = []
    if node.domain not in STANDARD_DOMAINS:
        return [Finding("domain", name, op, f"op of domain {node.domain!r}: the TensorRT ONNX parser reads "
                        "standard ONNX ops only (a non-standard op needs a TensorRT plugin)")]
    spec = ops["operators"].get(op)
    if spec is None or not spec["supported"]:
        why = "listed as unsupported" if spec else "not in the support list"
        return [Finding("operator", name, op, f"{op} is {why} by the TensorRT ONNX parser")]
    first = node.input[0] if node.input else ""
    t = g.types.get(first) if first else None
    if t and spec["types"] and t not in spec["types"] and op not in QDQ:
        f.append(Finding("type", name, op, f"input {first!r} is {t}; TensorRT supports {op} on "
                         f"{', '.join(spec['types'])}"))
    return f + _restriction_findings(node, g, ops["rules"])


def _restriction_findings(node: Any, g: _Graph, rules: dict[str, Any]) -> list[Finding]:
    name, op = node.name, node.op_type
    f = []
    for idx, what in rules["constant_inputs"]["ops"].get(op, {}).items():
        i = int(idx)
        if len(node.input) > i and node.input[i] and not g.is_const(node.input[i]):
            f.append(Finding("constant-input", name, op, f"input {what!r} ({node.input[i]}) must be an "
                             "initializer or Constant for TensorRT"))
    n_out = len([o for o in node.output if o])
    limit = rules["max_outputs"]["ops"].get(op)
    if limit is not None and n_out > limit:
        f.append(Finding("outputs", name, op, f"{n_out} outputs; TensorRT supports only the first "
                         f"(export {op} with {limit} output)"))
    attrs = _attrs(node)
    for a, allowed in rules["attribute_values"]["ops"].get(op, {}).items():
        if a in attrs and attrs[a] not in allowed:
            f.append(Finding("attribute", name, op, f"{a}={attrs[a]!r}; TensorRT supports {allowed}"))
    for a in rules["forbidden_attributes"]["ops"].get(op, []):
        if a in attrs:
            f.append(Finding("attribute", name, op, f"attribute {a!r} is not supported by TensorRT"))
    for a in rules["all_ones_attributes"]["ops"].get(op, []):
        if a in attrs and any(int(v) != 1 for v in attrs[a]):
            f.append(Finding("attribute", name, op, f"{a}={list(attrs[a])}: TensorRT needs empty or all ones"))
    ranks = rules["spatial_rank"]["ops"].get(op)
    if ranks and "kernel_shape" in attrs and len(attrs["kernel_shape"]) not in ranks:
        f.append(Finding("attribute", name, op, f"{len(attrs['kernel_shape'])}-D pooling; TensorRT pools 2-D "
                         "or 3-D only"))
    return f


# --------------------------------------------------------------------------------------------- Q/DQ rules


def _qdq_findings(node: Any, g: _Graph) -> list[Finding]:
    """Strongly typed explicit quantization: int8/FP8 via a constant zero point 0, positive constant scales, and
    the scale's type equal to the float data's type."""
    name, op = node.name, node.op_type
    f = []
    scale = node.input[1] if len(node.input) > 1 else ""
    zp = node.input[2] if len(node.input) > 2 else ""
    f += _zero_point_findings(node, g, zp)
    if not scale or not g.is_const(scale):
        f.append(Finding("qdq-scale", name, op, f"scale {scale!r} is not a constant: TensorRT needs build-time "
                         "scales"))
    else:
        s = g.value(scale)
        if s is not None and (not np.all(np.isfinite(s)) or np.any(s <= 0)):
            f.append(Finding("qdq-scale", name, op, f"scale {scale!r} has values <= 0 or non-finite "
                             f"(min {float(np.min(s)):.3g}): TensorRT scales must be positive"))
    st = g.types.get(scale)
    data_types = _float_side_types(node, g)
    for dname, dt in data_types:
        if st and dt and dt in FLOAT_TYPES and dt != st:
            f.append(Finding("qdq-type", name, op, f"{st} scale but {dname!r} is {dt}: in a strongly typed "
                             f"network the scale's type is the data's type ({st} Q/DQ only where the data is "
                             f"{st})"))
    return f


def _zero_point_findings(node: Any, g: _Graph, zp: str) -> list[Finding]:
    name, op = node.name, node.op_type
    if not zp:
        if op == "QuantizeLinear" and "output_dtype" not in _attrs(node):
            return [Finding("qdq-zero-point", name, op, "no zero point: ONNX then quantizes to uint8; TensorRT "
                            "needs an explicit int8 zero point of 0")]
        return []
    if not g.is_const(zp):
        return [Finding("qdq-zero-point", name, op, f"zero point {zp!r} is not a constant")]
    zt = g.types.get(zp)
    if zt not in QUANTIZED_TYPES:
        return [Finding("qdq-zero-point", name, op, f"zero point of type {zt}: TensorRT quantizes to "
                        f"{' / '.join(QUANTIZED_TYPES)} (symmetric; re-quantize with int8 activations)")]
    v = g.value(zp)
    if v is not None and np.any(v.astype(np.float32) != 0):
        return [Finding("qdq-zero-point", name, op, f"zero point {zp!r} is not 0: TensorRT quantization is "
                        "symmetric")]
    return []


def _float_side_types(node: Any, g: _Graph) -> list[tuple[str, str | None]]:
    """The float tensors a Q/DQ node's scale type must match: Q's input; for DQ, the other float inputs of its
    consumers, and the input of the Q feeding it."""
    if node.op_type == "QuantizeLinear":
        return [(node.input[0], g.types.get(node.input[0]))]
    out: list[tuple[str, str | None]] = []
    src = g.producer.get(node.input[0])
    if src is not None and src.op_type == "QuantizeLinear":
        out.append((src.input[0], g.types.get(src.input[0])))
    for o in node.output:
        for c in g.consumers.get(o, []):
            if c.op_type in QDQ:
                continue
            out += [(i, g.types.get(i)) for i in c.input if i and i != o and g.types.get(i) in FLOAT_TYPES]
    return out


# --------------------------------------------------------------------------------------------- entry points


def lint_model(model: Any, path: str = "<model>", base_dir: str = ".") -> LintReport:
    """Lint an in-memory ``onnx.ModelProto`` (external data, if any, is read from ``base_dir`` for Q/DQ values)."""
    from onnx import TensorProto

    ops = load_ops()
    rep = LintReport(path=path, source=ops["source"])
    g = _Graph(model, base_dir)
    rng = ops.get("opset") or {}
    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS and rng and not rng["min"] <= imp.version <= rng["max"]:
            rep.violations.append(Finding("opset", "", "", f"ONNX opset {imp.version}; the TensorRT parser "
                                          f"release cited documents opsets {rng['min']}..{rng['max']}"))
    for n in model.graph.node:
        rep.op_counts[n.op_type] = rep.op_counts.get(n.op_type, 0) + 1
        rep.violations += _node_findings(n, g, ops)
        if n.op_type in QDQ and n.domain in STANDARD_DOMAINS:
            rep.violations += _qdq_findings(n, g)
    rep.nodes = len(model.graph.node)
    for i in model.graph.input:
        if i.type.tensor_type.elem_type == TensorProto.INT64 and i.name not in g.inits:
            rep.notes.append(f"input {i.name!r} is int64: TensorRT 10 takes INT64 I/O natively (older releases "
                             "cast it to INT32)")
    q = rep.op_counts.get("QuantizeLinear", 0) + rep.op_counts.get("DequantizeLinear", 0)
    if q:
        rep.notes.append(f"explicit quantization: {q} Q/DQ nodes (build strongly typed; no INT8 builder flag)")
    return rep


def lint_onnx(path: str | os.PathLike) -> LintReport:
    """Lint the ONNX file ``path`` (weights stay on disk; only Q/DQ scales and zero points are read)."""
    onnx = require("onnx", "export", "the TensorRT lint")
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"no such ONNX file: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise ArtifactError(f"{p.name} is not a readable ONNX model: {type(e).__name__}") from e
    check_graph(model, p.name)
    return lint_model(model, path=str(p), base_dir=str(p.parent))


def check_graph(model: Any, name: str) -> None:
    """Refuse (one line) what is not a computation graph before linting it: no nodes (an empty or foreign file
    parses as an empty ModelProto), a node input that nothing produces, a value produced twice, or a cycle."""
    g = model.graph
    if not len(g.node):
        raise ArtifactError(f"{name} has no graph nodes: not an ONNX model (empty, or another kind of file)")
    producer: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            if o and o in producer:
                raise ArtifactError(f"{name}: value {o!r} is produced by two nodes: not a valid ONNX graph")
            if o:
                producer[o] = i
    given = {v.name for v in g.input} | {t.name for t in g.initializer} | {""}
    deps: list[set[int]] = []
    for n in g.node:
        missing = [x for x in n.input if x not in given and x not in producer]
        if missing:
            raise ArtifactError(f"{name}: node {n.name or n.op_type!r} reads {missing[0]!r}, which no node, input or "
                                "initializer provides: not a valid ONNX graph")
        deps.append({producer[x] for x in n.input if x in producer})
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for u in users.get(i, ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if done < len(deps):
        raise ArtifactError(f"{name}: the graph has a cycle ({len(deps) - done} nodes depend on each other's outputs): "
                            "not a valid ONNX graph")


def require_lint_pass(rep: LintReport) -> None:
    """Raise :class:`LintError` naming the first violation when the report fails."""
    if not rep.passed:
        more = f" (+{len(rep.violations) - 1} more)" if len(rep.violations) > 1 else ""
        raise LintError(f"{Path(rep.path).name} is not TensorRT-ready: {rep.violations[0].line()}{more}")
