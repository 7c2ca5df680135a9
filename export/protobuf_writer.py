"""Writing large ``onnx_ir`` models past the 2 GiB protobuf limit.

Either one external-data file above the 2 GiB protobuf limit, or a streamed self-contained .onnx that never
holds the whole serialized protobuf in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ditdeploy.errors import DitDeployError
from ditdeploy.export.graph import graph_stats

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**25


def save_model(model: Any, path: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Save an ``onnx_ir.Model``; weights in one ``<name>.data`` file (relative location) above the threshold.

    External data is written here with plain buffered writes of each tensor's memory (4 KiB-aligned offsets),
    which measured 3-4x faster than ``onnx_ir.save(external_data=...)`` (numpy ``tofile``) on this machine; the
    model's initializers are replaced by references into that file (the model is not reusable afterwards).
    Returns the files written, data file first.
    """
    import sys

    import numpy as np
    import onnx_ir as ir

    nbytes = graph_stats(model)["initializer_bytes"]
    if nbytes <= external_data_threshold:
        if sys.byteorder == "little":
            save_inline_streaming(model, path)
        else:  # pragma: no cover
            ir.save(model, path)
        return [path]
    data_name = path.name + ".data"
    if sys.byteorder != "little":  # pragma: no cover - raw ONNX data is little-endian
        ir.save(model, path, external_data=data_name, size_threshold_bytes=1024, alignment=4096)
        return [path.with_name(data_name), path]
    offset = 0
    with open(path.with_name(data_name), "wb") as f:
        for value in model.graph.initializers.values():
            t = value.const_value
            if t is None or t.nbytes < 1024 or isinstance(t, ir.ExternalTensor):
                continue
            pad = (-offset) % 4096
            if pad:
                f.write(b"\0" * pad)
                offset += pad
            arr = np.ascontiguousarray(t.numpy())
            f.write(memoryview(arr).cast("B"))
            value.const_value = ir.ExternalTensor(data_name, offset, int(t.nbytes), t.dtype, shape=t.shape,
                                                  name=value.name, base_dir=path.parent)
            offset += int(t.nbytes)
    ir.save(model, path)
    return [path.with_name(data_name), path]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_MODEL_GRAPH_TAG = b"\x3a"  # ModelProto.graph: field 7, length-delimited


_GRAPH_INIT_TAG = b"\x2a"  # GraphProto.initializer: field 5


_TENSOR_RAW_TAG = b"\x4a"  # TensorProto.raw_data: field 9


def save_inline_streaming(model: Any, path: Path) -> None:
    """Write an ``onnx_ir.Model`` as one self-contained .onnx without building the whole protobuf in memory.

    ``onnx_ir.save`` serializes every weight into a ModelProto and then into one bytes object (two extra copies
    of all weights: 3.2x the weight bytes peak for L/2). Here the model is serialized with its large initializers
    left empty, and the file is assembled in protobuf wire format: the model's other fields, then the graph field
    whose initializer entries get their ``raw_data`` field streamed straight from each tensor's memory (fields may
    appear in any order in the wire format; ``onnx.load`` yields the same ModelProto as ``onnx_ir.save``).
    """
    import numpy as np
    import onnx
    import onnx_ir as ir

    originals: dict[str, Any] = {}
    for name, v in model.graph.initializers.items():
        t = v.const_value
        if t is None or isinstance(t, ir.ExternalTensor) or t.nbytes < 1024 or t.dtype == ir.DataType.STRING:
            continue
        originals[name] = t
        v.const_value = ir.ExternalTensor("__streamed__", 0, int(t.nbytes), t.dtype, shape=t.shape, name=name)
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for name, t in originals.items():
            model.graph.initializers[name].const_value = t
    graph = proto.graph
    inits = list(graph.initializer)
    graph.ClearField("initializer")
    graph_bytes = graph.SerializeToString()
    proto.ClearField("graph")
    head = proto.SerializeToString()
    entries: list[tuple[bytes, Any, int]] = []
    for tp in inits:
        t = originals.get(tp.name) if tp.data_location == onnx.TensorProto.EXTERNAL else None
        if t is not None:
            tp.ClearField("external_data")
            tp.ClearField("data_location")
            meta = tp.SerializeToString()
            n = int(t.nbytes)
            entries.append((meta, t, len(meta) + 1 + len(_varint(n)) + n))
        else:
            meta = tp.SerializeToString()
            entries.append((meta, None, len(meta)))
    graph_len = len(graph_bytes) + sum(1 + len(_varint(size)) + size for _, _, size in entries)
    if len(head) + graph_len >= 2**31:
        raise DitDeployError("model is too large for a single .onnx file (2 GiB protobuf limit): use external data")
    with open(path, "wb") as f:
        f.write(head)
        f.write(_MODEL_GRAPH_TAG + _varint(graph_len))
        f.write(graph_bytes)
        for meta, t, size in entries:
            f.write(_GRAPH_INIT_TAG + _varint(size))
            f.write(meta)
            if t is not None:
                arr = np.ascontiguousarray(t.numpy())
                f.write(_TENSOR_RAW_TAG + _varint(arr.nbytes))
                f.write(memoryview(arr).cast("B"))
