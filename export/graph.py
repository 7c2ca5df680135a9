"""The exported graph itself: dynamo export to ``onnx_ir``, cleanup, statistics and metadata.

Cleanup rewrites Einsum -> Transpose and tidies names.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from ditdeploy.errors import DitDeployError
from ditdeploy.export.onnxscript_compat import optimize_graph
from ditdeploy.system.interrupts import deferred

DEFAULT_OPSET = 18


MIN_OPSET = 17  # LayerNormalization is a single op from opset 17


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the dynamo exporter's chatter (torchvision op registration, deprecation warnings)."""
    names = ["torch.onnx", "torch.export", "torch._dynamo", "torch._export", "onnxscript", "torch.fx"]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for n, lv in levels.items():
                logging.getLogger(n).setLevel(lv)


def dynamo_export(module: Any, args: tuple, input_names: Sequence[str], output_names: Sequence[str],
                  dynamic: dict[str, dict[int, str]], opset: int) -> Any:
    """``torch.onnx.export(dynamo=True)`` + ``optimize_graph`` -> ``onnx_ir.Model``; dims named per ``dynamic``."""
    import torch

    dims: dict[str, Any] = {}
    shapes = {}
    for name in input_names:
        spec = {}
        for axis, dim_name in dynamic.get(name, {}).items():
            dims.setdefault(dim_name, torch.export.Dim(dim_name.replace("-", "_")))
            spec[axis] = dims[dim_name]
        shapes[name] = spec
    with deferred():  # the exporter's first use imports onnx/onnxscript (C extensions): never interrupt that
        import onnx  # noqa: F401
        import onnx_ir  # noqa: F401
        import onnxscript  # noqa: F401
    with quiet_exporter(), torch.inference_mode(False), torch.no_grad():
        try:
            prog = torch.onnx.export(
                module, args, dynamo=True, input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=shapes, opset_version=opset, optimize=False, verbose=False, report=False,
            )
            optimize_graph(prog.model)
        except Exception as e:  # the exporter's errors are long multi-page reports
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DitDeployError(f"torch.onnx.export (dynamo) failed: {first[:300]}") from e
    model = prog.model
    for v in list(model.graph.inputs) + list(model.graph.outputs):
        spec = dynamic.get(v.name, {})
        if v.shape is not None and spec:
            import onnx_ir as ir

            dims_ = list(v.shape)
            for axis, dim_name in spec.items():
                dims_[axis] = ir.SymbolicDim(dim_name)
            v.shape = ir.Shape(dims_)
    return model


def cleanup(model: Any) -> dict[str, Any]:
    """In-place graph cleanup on an ``onnx_ir.Model``; returns what changed.

    - single-operand Einsum that only permutes axes (the DiT unpatchify) -> Transpose (plainer for every backend);
    - opset 17: ``Split(num_outputs=k)`` (an opset-18 attribute the exporter's down-conversion leaves behind, which
      ORT rejects) -> ``Split`` with an explicit sizes input.
    Constant folding, shape inference, dead-node removal, CSE already ran in the exporter's optimizer.
    """
    import numpy as np
    import onnx_ir as ir

    strip_stack_traces(model)
    rewrites = 0
    splits = 0
    opset = model.opset_imports.get("", DEFAULT_OPSET)
    for node in list(model.graph):
        if opset < 18 and node.op_type == "Split" and node.domain in ("", "ai.onnx") and "num_outputs" in node.attributes:
            k = int(node.attributes.pop("num_outputs").value)
            axis = int(node.attributes["axis"].value) if "axis" in node.attributes else 0
            shape = node.inputs[0].shape
            dim = shape[axis] if shape is not None else None
            if not isinstance(dim, int):
                raise DitDeployError(f"opset {opset}: cannot rewrite {node.name} (Split over a dynamic axis); "
                                     "use --opset 18")
            chunk = -(-dim // k)
            sizes = [min(chunk, dim - i * chunk) for i in range(k)]
            const = ir.Value(name=f"{node.name}_sizes", const_value=ir.tensor(np.array(sizes, dtype=np.int64)))
            model.graph.register_initializer(const)
            node.resize_inputs(2)
            node.replace_input_with(1, const)
            splits += 1
            continue
        if node.op_type == "Einsum" and node.domain in ("", "ai.onnx") and len(node.inputs) == 1:
            eq = node.attributes["equation"].value.replace(" ", "")
            if "->" not in eq or "." in eq:
                continue
            src, dst = eq.split("->")
            if sorted(src) != sorted(dst) or len(set(src)) != len(src):
                continue
            perm = [src.index(ch) for ch in dst]
            node.op_type = "Transpose"
            node.attributes.pop("equation")
            node.attributes["perm"] = ir.AttrInt64s("perm", perm)
            rewrites += 1
    out = {"einsum_to_transpose": rewrites}
    if splits:
        out["split_num_outputs_to_sizes"] = splits
    return out


def strip_stack_traces(model: Any) -> int:
    """Drop the exporter's per-node Python stack traces (``pkg.torch.onnx.stack_trace``); returns the count.

    They name the exporting machine's source paths (``/home/<user>/...``), so the same model exported from two
    installs gave two different files; module scopes and fx node names (no paths) are kept for debugging.
    """
    n = 0
    for node in model.graph.all_nodes():
        if node.metadata_props.pop("pkg.torch.onnx.stack_trace", None) is not None:
            n += 1
    return n


def graph_stats(model: Any) -> dict[str, Any]:
    """Node count, op histogram and initializer bytes of an ``onnx_ir.Model``."""
    from collections import Counter

    ops = Counter(n.op_type for n in model.graph)
    nbytes = sum(int(v.const_value.nbytes) for v in model.graph.initializers.values() if v.const_value is not None)
    return {"nodes": sum(ops.values()), "ops": dict(sorted(ops.items())), "initializer_bytes": nbytes}


def set_metadata(model: Any, props: dict[str, str]) -> None:
    """Add ``metadata_props`` (string key/values) and producer info to an ``onnx_ir.Model``."""
    model.metadata_props.update(props)
    model.producer_name = "ditdeploy"
    with contextlib.suppress(Exception):
        import importlib.metadata as md

        model.producer_version = md.version("ditdeploy")
