"""The private onnxscript internals ditdeploy relies on, isolated in one place.

- ``onnxscript.optimizer._constant_folding`` (``FoldConstantsPass`` and its size limits): the public
  ``onnxscript.optimizer.optimize`` also runs the pattern-rewrite pass, which cost 10-20 CPU-s on XL/2 for ~10 of
  ~760 nodes on S/2. When onnxscript exposes constant folding publicly (or the rewrite pass can be turned off in
  ``optimize``), switch to that and drop this import.
- ``drop_weights`` reaches into the module-level rewrite rules' matcher state (``_graph``, ``_current_node``,
  ``_match``, ``_tracer``) to unpin the exported graph. It can go when onnxscript stops keeping the last matched graph
  alive (check with ``gc.get_referrers(model.graph)`` after an export).

pyproject.toml bounds onnxscript and onnx_ir from above (the versions these internals were checked against).
"""

from __future__ import annotations

from typing import Any


def optimize_graph(model: Any) -> None:
    """onnxscript's optimizer pipeline minus its pattern-rewrite pass, in place on an ``onnx_ir.Model``.

    Constant folding (with shape inference), dead-node removal, constants lifted to initializers, duplicate
    initializers merged, common subexpressions eliminated, output/name fixes. The rewrite pass
    (``optimize=True`` in ``torch.onnx.export``) cost 10-20 CPU-s on XL/2 and removed only ~10 of ~760 nodes on S/2
    (ONNX Runtime's own optimizer ends within 9 nodes of it either way, same outputs, same speed): skipped.
    """
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import _constant_folding as cf

    passes = [
        common.InlinePass(),
        cf.FoldConstantsPass(shape_inference=True, input_size_limit=cf.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                             output_size_limit=cf.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    ]
    for p in passes:
        p(model)


def drop_weights(model: Any) -> None:
    """Detach every initializer's data from a saved ``onnx_ir.Model`` and unpin its graph.

    onnxscript's module-level rewrite rules keep references to the last graph they matched (their matchers'
    ``_graph``, ``_current_node``, ``_match``), so the exported graph and, through the tensors it wraps, the torch
    parameters would otherwise stay alive for the life of the process.
    """
    import gc

    graph = model.graph
    for v in graph.initializers.values():
        v.const_value = None
    for v in graph.inputs:
        if getattr(v, "const_value", None) is not None:
            v.const_value = None
    for r in gc.get_referrers(graph):
        if isinstance(r, dict) and r.get("_graph") is graph:
            for k in ("_graph", "_current_node", "_match", "_tracer"):
                if k in r:
                    r[k] = None
