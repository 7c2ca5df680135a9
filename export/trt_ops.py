"""The TensorRT ONNX parser's published operator support list, kept as data (``trt_ops.json`` beside this file).

``trt_ops.json`` holds two parts:

- ``operators``: every row of onnx-tensorrt's ``docs/operators.md`` (supported Y/N, supported types, restriction
  text), converted by :func:`parse_operators_md` from the release named in ``source`` (branch, commit, file);
- ``rules``: the machine-checkable restrictions, written by hand from that restriction text (each rule quotes the
  sentence it encodes), e.g. "`axes` must be an initializer" -> input 1 of ReduceMean must be a constant.

Regenerate the operator table for another release (the hand-written rules are kept)::

    python -m ditdeploy.export.trt_ops operators.md --branch 10.x-GA --commit SHA
"""

from __future__ import annotations

import argparse
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["OPS_JSON", "load_ops", "parse_operators_md"]

OPS_JSON = Path(__file__).with_name("trt_ops.json")

# Type names used in operators.md -> ONNX TensorProto names ("INF64" is a typo in the 10.x table for INT64)
TYPE_NAMES = {"FP32": "FLOAT", "FP16": "FLOAT16", "BF16": "BFLOAT16", "INT32": "INT32", "INT64": "INT64",
              "INF64": "INT64", "INT8": "INT8", "UINT8": "UINT8", "BOOL": "BOOL", "FP8": "FLOAT8E4M3FN",
              "INT4": "INT4", "DOUBLE": "DOUBLE", "FP4": "FLOAT4E2M1"}


def parse_operators_md(text: str) -> dict[str, Any]:
    """Rows of the operator support matrix -> ``{op: {supported, types, restrictions}}`` plus the opset range."""
    ops: dict[str, Any] = {}
    for line in text.splitlines():
        if not line.startswith("|") or line.startswith("|--"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[0] in ("Operator", "") or not cells[1]:
            continue
        supported = cells[1].split()[0].upper() == "Y"
        types = [TYPE_NAMES.get(t.strip().upper(), t.strip().upper())
                 for t in (cells[2].split(",") if len(cells) > 2 and cells[2] else []) if t.strip()]
        ops[cells[0]] = {"supported": supported, "types": types,
                         "restrictions": re.sub(r"<br\s*/?>", " ", cells[3]).strip() if len(cells) > 3 else ""}
    m = re.search(r"opset (\d+) to opset (\d+)", text)
    opset = {"min": int(m.group(1)), "max": int(m.group(2))} if m else None
    return {"operators": ops, "opset": opset}


@lru_cache(maxsize=1)
def load_ops() -> dict[str, Any]:
    """The shipped support list (``source``, ``opset``, ``operators``, ``rules``)."""
    return json.loads(OPS_JSON.read_text())


def _main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Rewrite trt_ops.json's operator table from onnx-tensorrt's "
                                             "docs/operators.md (the hand-written rules are kept).")
    ap.add_argument("md", type=Path)
    ap.add_argument("--branch", required=True)
    ap.add_argument("--commit", required=True)
    a = ap.parse_args(argv)
    old = json.loads(OPS_JSON.read_text()) if OPS_JSON.exists() else {}
    text = a.md.read_text()
    parsed = parse_operators_md(text)
    header = next((ln for ln in text.splitlines() if "supports operators" in ln), "").strip()
    out = {"source": {"repository": "https://github.com/onnx/onnx-tensorrt", "branch": a.branch,
                      "commit": a.commit, "file": "docs/operators.md", "statement": header},
           "opset": parsed["opset"], "rules": old.get("rules", {}), "operators": parsed["operators"]}
    OPS_JSON.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")


if __name__ == "__main__":
    _main()
