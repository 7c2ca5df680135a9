"""Which GEMMs of an exported DiT graph are safe to quantize: node roles from ONNX metadata or topology.

Every MatMul / Gemm / Conv node of a denoiser ONNX graph gets a role:

- ``embedder``: patch embedding (Conv), timestep-embedding MLP;
- ``adaln``: the adaLN(-Zero) modulation linears of the blocks (and of the final layer);
- ``final``: the final projection to ``p*p*out_channels``;
- ``attention``: MatMuls with two activation inputs (QK^T and attention x V);
- ``linear``: the token GEMMs ``qkv``, ``proj``, ``fc1``, ``fc2`` (and cross-attention projections of the tokens);
- ``other``: anything that could not be identified (kept in high precision).

Only ``linear`` nodes are quantized by default (docs/reference.md §3: embedders, adaLN modulation, the final layer and
attention stay in high precision). Roles come from the torch module path that the dynamo exporter records in each
node's ``pkg.torch.onnx.name_scopes`` metadata; graphs without that metadata (other exporters, graph rewriters that
drop it) fall back to topology: which graph input a node's activation depends on, and whether its weight is a
constant.
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_EXCLUDE",
    "GROUPS",
    "NodeRole",
    "classify_nodes",
    "module_role",
    "resolve_exclusions",
]

QUANTIZABLE_OPS = ("MatMul", "Gemm", "Conv")
GROUPS = ("embedder", "adaln", "final", "attention", "linear", "other")
DEFAULT_EXCLUDE = ("embedder", "adaln", "final", "attention", "other")
SCOPE_KEY = "pkg.torch.onnx.name_scopes"
_LINEAR_LEAVES = {"qkv", "proj", "fc1", "fc2", "q", "kv", "cq", "ckv", "cproj"}
# module names of the reference DiT and of the fp16 export's HalfDiT (export/fp16.py)
_EMBEDDERS = ("x_embedder", "t_embedder", "y_embedder", "patch_proj", "t_fc1", "t_fc2")
_ADALN = ("adaLN_modulation", "ada", "final_ada")
WRAPPER = "model."  # CacheFull / CacheLight (ditdeploy.feature_cache) hold the DiT as ``self.model``


@dataclass(frozen=True)
class NodeRole:
    """A quantizable node: its ONNX name and op, the torch module it came from (if known), its role, and how the
    role was decided (``metadata`` or ``topology``)."""

    name: str
    op_type: str
    role: str
    module: str
    how: str
    weight: str | None  # the constant (initializer) input, if any


def _scopes(node) -> list[str] | None:
    for p in node.metadata_props:
        if p.key == SCOPE_KEY:
            try:
                v = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            return [str(s) for s in v] if isinstance(v, (list, tuple)) else None
    return None


def _module_of(scopes: list[str]) -> str:
    """The innermost module path: the name scopes end with the fx node's own name (``linear_4``)."""
    mods = [s for s in scopes[:-1] if s]
    mod = mods[-1] if mods else ""
    # the two-graph export (export/cache_graphs.py) wraps the DiT as ``model``: same roles and globs as the DiT's
    return mod[len(WRAPPER):] if mod.startswith(WRAPPER) else mod


def _role_from_module(module: str, op_type: str, n_const: int, scopes: list[str]) -> str:
    parts = module.split(".")
    if parts[0] in _EMBEDDERS:
        return "embedder"
    if any(p in _ADALN for p in parts):
        return "adaln"
    if parts[0] in ("final_layer", "final_linear"):
        return "final"
    if n_const == 0 or any("scaled_dot_product_attention" in s for s in scopes):
        return "attention"
    if parts[-1] in _LINEAR_LEAVES:
        return "linear"
    return "other"


def module_role(module: str) -> str:
    """Role of a torch module path holding a weight GEMM (e.g. ``blocks.3.mlp.fc1`` -> ``linear``): the same rule the
    ONNX node classification applies, for quantizers that work on the torch model (FP8, ``export/fp8.py``)."""
    return _role_from_module(module, "Gemm", 1, [])


def _constants(graph) -> set[str]:
    """Tensors whose values are fixed: initializers, Constant outputs, and outputs of ops on constants only."""
    const = {i.name for i in graph.initializer}
    for n in graph.node:  # nodes are topologically sorted in a valid ONNX graph
        if n.op_type == "Constant" or (n.input and all((not i) or i in const for i in n.input)
                                       and n.op_type not in ("RandomNormal", "RandomUniform")):
            const.update(o for o in n.output if o)
    return const


def _depends_on(graph, sources: Iterable[str]) -> set[str]:
    """All tensors that (transitively) depend on any of ``sources``."""
    dep = set(sources)
    for n in graph.node:
        if any(i in dep for i in n.input if i):
            dep.update(o for o in n.output if o)
    return dep


def classify_nodes(model) -> list[NodeRole]:
    """Roles of every MatMul / Gemm / Conv node of ``model`` (an ``onnx.ModelProto``; weights need not be loaded)."""
    g = model.graph
    const = _constants(g)
    inputs = [i.name for i in g.input]
    dep_x = _depends_on(g, [n for n in inputs if n == "x"] or inputs[:1])
    dep_t = _depends_on(g, [n for n in inputs if n == "t"])
    dep_y = _depends_on(g, [n for n in inputs if n == "y"])
    cands = [n for n in g.node if n.op_type in QUANTIZABLE_OPS]
    # topology: the last x-path GEMM with a constant weight is the final projection
    x_weighted = [n for n in cands if any(i in const for i in n.input[:2]) and any(i in dep_x for i in n.input[:2])]
    last_x = x_weighted[-1].name if x_weighted else None
    roles = []
    for n in cands:
        ins = [i for i in n.input[:2] if i]
        consts = [i for i in ins if i in const]
        weight = consts[0] if consts else None
        scopes = _scopes(n)
        if scopes:
            module = _module_of(scopes)
            roles.append(NodeRole(n.name, n.op_type, _role_from_module(module, n.op_type, len(consts), scopes),
                                  module, "metadata", weight))
            continue
        act = [i for i in ins if i not in const]
        if n.op_type == "Conv":
            role = "embedder"
        elif not consts:
            role = "attention"
        elif not any(i in dep_x for i in act):
            # conditioning path: timestep MLP depends on t only; adaLN on the sum of t and y embeddings
            role = "adaln" if any(i in dep_y for i in act) and any(i in dep_t for i in act) else "embedder"
        elif n.name == last_x:
            role = "final"
        else:
            role = "linear"
        roles.append(NodeRole(n.name, n.op_type, role, "", "topology", weight))
    return roles


def resolve_exclusions(roles: Sequence[NodeRole], exclude: Sequence[str] | None = None
                       ) -> tuple[list[NodeRole], list[NodeRole]]:
    """Split ``roles`` into (quantized, excluded) nodes.

    ``exclude`` items (None = :data:`DEFAULT_EXCLUDE`): a role name (``embedder``, ``adaln``, ``final``,
    ``attention``, ``linear``, ``other``), ``default`` (the default roles), ``none`` (exclude nothing: quantize every
    MatMul/Gemm/Conv), or a glob matched against node names and module paths (``blocks.27.*``, ``*fc2``). An item
    that matches nothing is an error (typos must not silently quantize a sensitive layer).
    """
    from ditdeploy.errors import DitDeployError

    items = list(DEFAULT_EXCLUDE) if exclude is None else [e.strip() for e in exclude if e and e.strip()]
    if "none" in items:
        if len(items) > 1:
            raise DitDeployError("--exclude none cannot be combined with other exclusions")
        return list(roles), []
    expanded: list[str] = []
    for e in items:
        expanded.extend(DEFAULT_EXCLUDE if e == "default" else [e])
    excluded: dict[str, NodeRole] = {}
    for e in expanded:
        if e in GROUPS:
            hit = [r for r in roles if r.role == e]
        else:
            hit = [r for r in roles if fnmatch.fnmatchcase(r.name, e) or (r.module and fnmatch.fnmatchcase(r.module, e))]
            if not hit:
                raise DitDeployError(
                    f"--exclude {e!r} matches no MatMul/Gemm/Conv node or module; roles are {', '.join(GROUPS)}, "
                    "globs match node names or module paths like 'blocks.27.*'"
                )
        for r in hit:
            excluded[r.name] = r
    quantized = [r for r in roles if r.name not in excluded]
    return quantized, [r for r in roles if r.name in excluded]


def role_counts(roles: Iterable[NodeRole]) -> dict[str, int]:
    """How many nodes have each role."""
    out = dict.fromkeys(GROUPS, 0)
    for r in roles:
        out[r.role] = out.get(r.role, 0) + 1
    return {k: v for k, v in out.items() if v}
