"""What an ONNX file itself says, read without the ``onnx`` package, and the checks of a manifest against it.

Deploy path: stdlib + mmap. :func:`scan` walks the protobuf wire format of a ModelProto (graph ->
initializers, node attributes, subgraphs) skipping tensor payloads, and returns every initializer's dims and
every external-data file the model references. :func:`check_against_manifest` then refuses (one-line
``ArtifactError``):

- an external-data ``location`` that the manifest does not list (so it would run unverified) or that escapes
  the artifact's folder;
- manifest config values the graph contradicts: class count (rows of ``y_embedder.embedding_table.weight`` =
  classes + 1 null class when trained with label dropout), channels and patch size
  (``x_embedder.proj.weight``), patch grid and width (``pos_embed``). Graphs without these initializers
  (renamed by a quantizer) are not judged on them.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditdeploy.errors import ArtifactError

__all__ = ["OnnxScan", "check_against_manifest", "check_listed", "scan"]

# field numbers (onnx.proto3)
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE = 1, 5, 15
_NODE_ATTR, _FUNC_NODE = 5, 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_TENSOR_DIMS, _TENSOR_NAME, _TENSOR_EXT = 1, 8, 13
_SPARSE_VALUES = 1


@dataclass
class OnnxScan:
    """Initializer dims by name and the external-data locations a model references."""

    dims: dict[str, tuple[int, ...]] = field(default_factory=dict)
    external: set[str] = field(default_factory=set)


def _varint(buf: Any, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: Any, start: int, end: int):
    """(field number, wire type, value or (lo, hi) span) of each field in ``buf[start:end]``."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
            yield num, wt, v
        elif wt == 1:
            i += 8
        elif wt == 2:
            n, i = _varint(buf, i)
            if i + n > end:
                raise ValueError("field runs past its message")
            yield num, wt, (i, i + n)
            i += n
        elif wt == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")


def _tensor(buf: Any, span: tuple[int, int], out: OnnxScan) -> None:
    dims: list[int] = []
    name = ""
    for num, wt, v in _fields(buf, *span):
        if num == _TENSOR_DIMS and wt == 0:
            dims.append(v)
        elif num == _TENSOR_DIMS and wt == 2:
            j = v[0]
            while j < v[1]:
                d, j = _varint(buf, j)
                dims.append(d)
        elif num == _TENSOR_NAME and wt == 2:
            name = bytes(buf[v[0]:v[1]]).decode("utf-8", "replace")
        elif num == _TENSOR_EXT and wt == 2:
            kv = {k: bytes(buf[s[0]:s[1]]).decode("utf-8", "replace") for k, w, s in _fields(buf, *v) if w == 2}
            if kv.get(1) == "location" and 2 in kv:
                out.external.add(kv[2])
    if name:
        out.dims[name] = tuple(dims)


def _graph(buf: Any, span: tuple[int, int], out: OnnxScan) -> None:
    for num, wt, v in _fields(buf, *span):
        if wt != 2:
            continue
        if num == _GRAPH_INIT:
            _tensor(buf, v, out)
        elif num == _GRAPH_SPARSE:
            for n2, w2, v2 in _fields(buf, *v):
                if n2 == _SPARSE_VALUES and w2 == 2:
                    _tensor(buf, v2, out)
        elif num == _GRAPH_NODE:
            _node(buf, v, out)


def _node(buf: Any, span: tuple[int, int], out: OnnxScan) -> None:
    for num, wt, v in _fields(buf, *span):
        if num != _NODE_ATTR or wt != 2:
            continue
        for n2, w2, v2 in _fields(buf, *v):
            if w2 != 2:
                continue
            if n2 in (_ATTR_T, _ATTR_TENSORS):
                _tensor(buf, v2, out)
            elif n2 in (_ATTR_G, _ATTR_GRAPHS):
                _graph(buf, v2, out)


def scan(path: str | os.PathLike) -> OnnxScan:
    """Read ``path``'s initializer dims and external-data locations (ArtifactError if it is not a ModelProto)."""
    path = Path(path)
    out = OnnxScan()
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for num, wt, v in _fields(buf, 0, len(buf)):
                if num == _MODEL_GRAPH and wt == 2:
                    _graph(buf, v, out)
                elif num == _MODEL_FUNCTIONS and wt == 2:
                    for n2, w2, v2 in _fields(buf, *v):
                        if n2 == _FUNC_NODE and w2 == 2:
                            _node(buf, v2, out)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path.name} is not a readable ONNX model ({e})") from e
    return out


def _expect(what: str, got: Any, want: Any, path: Path) -> None:
    if got != want:
        raise ArtifactError(f"the manifest of {path.name} says {what} {want} but the graph has {got}: the manifest "
                            "and the model do not belong together; re-export it")


def check_against_manifest(path: str | os.PathLike, manifest: Any, config: Any = None) -> OnnxScan:
    """Check the ONNX at ``path`` against its (verified) manifest: external data listed, config confirmed."""
    from ditdeploy.artifact.files import safe_member

    path = Path(path)
    s = scan(path)
    listed = set((manifest.get("files") or {}) if hasattr(manifest, "get") else {})
    for loc in sorted(s.external):
        safe_member(path.parent, loc)
        if loc not in listed:
            raise ArtifactError(f"{path.name} reads external data {loc!r} that its manifest does not list, so it "
                                "cannot be verified: re-export the artifact")
    if config is None:
        return s
    emb = s.dims.get("y_embedder.embedding_table.weight")
    if emb and len(emb) == 2:
        null = 1 if getattr(config, "class_dropout_prob", 0) > 0 else 0
        _expect("num_classes", emb[0] - null, config.num_classes, path)
    proj = s.dims.get("x_embedder.proj.weight")
    if proj and len(proj) == 4:
        _expect("in_channels", proj[1], config.in_channels, path)
        _expect("patch_size", proj[2], config.patch_size, path)
        _expect("hidden_size", proj[0], config.hidden_size, path)
    pos = s.dims.get("pos_embed")
    if pos and len(pos) == 3 and config.patch_size:
        _expect("a patch grid of", pos[1], (config.input_size // config.patch_size) ** 2, path)
    return s


def check_listed(path: str | os.PathLike, manifest: Any, config: Any = None) -> None:
    """Every file a runtime reads for the model at ``path`` is listed in its (verified) manifest, whatever the
    backend: an ONNX model's external data (:func:`check_against_manifest`, which also confirms ``config``), an
    OpenVINO IR's ``.bin``. ArtifactError (one line) otherwise."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        check_against_manifest(path, manifest, config)
    elif path.suffix.lower() == ".xml":
        listed = (manifest.get("files") or {}) if hasattr(manifest, "get") else {}
        weights = path.with_suffix(".bin").name
        if weights not in listed:
            raise ArtifactError(f"{path.name} reads its weights from {weights!r}, which its manifest does not list, "
                                "so they cannot be verified: re-export the artifact")
