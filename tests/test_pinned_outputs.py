"""Pins the outputs of `sample`, `check`, `bench` and `export` on the shipped digits model, so that refactors of the
command layer and the library under it stay bit-identical (issue 13: "behaviour unchanged").

What is pinned (tests/data/pinned_outputs.json):
- sample: sha256 of the PNG grid and of the npz (fixed seed, 4 steps, one image per class);
- check: every numeric field of the JSON report (per-call and end-to-end parity numbers, thresholds, settings);
- bench: every non-timing field of the JSON rows (config, FLOPs, batch, counts, finiteness, sizes) and settings;
- export: sha256 of the exported digits ONNX (deterministic: two runs gave the same bytes) and its manifest's
  parity numbers and graph op counts.

Floating-point results depend on the CPU's instruction set and on the library versions (ONNX Runtime, torch, numpy
pick kernels by ISA), so exact equality is asserted only on the environment the pins were recorded on (the
``env`` key in the pin file); elsewhere the float fields are compared with a tolerance (rel 1e-4: the fp32
reassociation noise between ISAs is ~1e-6 relative) and the file hashes are not compared. Fields added to a report
after the pins were recorded are allowed; a pinned field that changes or disappears fails.
Re-record (only after an intended output change, saying so in the commit): ``DITDEPLOY_REPIN=1 pytest
tests/test_pinned_outputs.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from pathlib import Path

import pytest
from conftest import run_main

PINS = Path(__file__).parent / "data" / "pinned_outputs.json"
REPIN = os.environ.get("DITDEPLOY_REPIN") == "1"
ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "fma")
# bench row fields that are measurements of time/memory/machine, not outputs of the computation
BENCH_VOLATILE = {"denoiser_ms_all", "denoiser_ms_median", "denoiser_ms_min", "denoiser_ms_p90", "e2e_decoder_s",
                  "e2e_denoiser_s", "e2e_s", "gflops", "images_per_s", "load_s", "pct_of_peak", "peak_rss_mb",
                  "sampler_overhead_pct", "speedup_vs_torch_fp32", "torch_fp32_ms", "gpu_mem_mb", "peak_gflops",
                  "env"}


def _env_key() -> dict:
    import numpy
    import onnxruntime

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    try:
        import torch

        tv = torch.__version__
    except ImportError:  # pragma: no cover
        tv = None
    return {"machine": platform.machine(), "isa": sorted(f for f in ISA if f in flags),
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__, "torch": tv}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _load_pins() -> dict:
    return json.loads(PINS.read_text()) if PINS.exists() else {}


_recorded: dict = {}


def _pin(key: str, value) -> None:
    """Assert ``value`` equals the pin ``key`` (exactly on the recording environment, floats within rel 1e-4
    elsewhere; hashes only on the recording environment), or record it under DITDEPLOY_REPIN=1."""
    value = json.loads(json.dumps(value))  # the JSON view: tuples -> lists, like the pin file
    if REPIN:
        pins = _load_pins()
        pins["env"] = _env_key()
        pins[key] = value
        PINS.parent.mkdir(parents=True, exist_ok=True)
        PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
        return
    pins = _load_pins()
    assert key in pins, f"no pin {key!r} in {PINS}: record with DITDEPLOY_REPIN=1"
    if pins.get("env") == _env_key():
        assert _pinned_view(value, pins[key]) == pins[key], f"{key} changed:\n now {value}\n pin {pins[key]}"
    else:
        _close(value, pins[key], key)


def _pinned_view(a, b):
    """``a`` restricted to the keys the pin ``b`` has (recursively): fields added to a report later are allowed,
    a pinned field that changed or disappeared is not."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _pinned_view(a[k], b[k]) for k in a if k in b}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [_pinned_view(x, y) for x, y in zip(a, b, strict=True)]
    return a


def _close(a, b, where: str) -> None:
    if isinstance(b, dict):
        assert isinstance(a, dict) and set(b) <= set(a), f"{where}: pinned keys {sorted(set(b) - set(a))} gone"
        for k in b:
            if k.startswith("sha256"):
                continue  # bytes differ across ISAs/versions; exact on the recording environment only
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), f"{where}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(b, float) and not isinstance(b, bool):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-9), f"{where}: {a} vs pinned {b}"
    else:
        assert a == b, f"{where}: {a!r} != pinned {b!r}"


def test_sample_outputs_pinned(tmp_path):
    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    code, _, err = run_main(["sample", "--steps", "4", "--seed", "3", "--num-per-label", "1", "--npz", npz,
                             "--out", png, "--no-progress"])
    assert code == 0, err
    _pin("sample", {"sha256_png": _sha(png), "sha256_npz": _sha(npz)})


def test_check_report_pinned(tmp_path):
    from ditdeploy.checking import has_torch

    if not has_torch():
        pytest.skip("check against the PyTorch reference needs torch")
    engine = Path(__file__).resolve().parent.parent / "ditdeploy" / "assets" / "digits.onnx"
    rep = tmp_path / "c.json"
    code, out, err = run_main(["check", "--engine", engine, "--steps", "4", "--timesteps", "2", "--batch-size", "2",
                               "--json", rep])
    assert code == 0, err
    r = json.loads(rep.read_text())
    assert r["passed"] is True
    r.pop("artifact")  # an absolute path of this checkout
    _pin("check", r)


def test_bench_fields_pinned(tmp_path):
    from ditdeploy.checking import has_torch

    if not has_torch():
        pytest.skip("the bench baseline row needs torch")
    js = tmp_path / "b.json"
    code, _, err = run_main(["bench", "--steps", "2", "--repeats", "1", "--warmup", "0", "--batch-sizes", "1,2",
                             "--no-probe", "--in-process", "--backends", "onnxruntime", "--json", js])
    assert code == 0, err
    d = json.loads(js.read_text())
    assert not d["errors"], d["errors"]
    rows = [{k: v for k, v in r.items() if k not in BENCH_VOLATILE} for r in d["rows"]]
    targets = [{k: v for k, v in t.items() if k not in ("path", "env")} for t in d["targets"]]
    _pin("bench", {"rows": rows, "settings": d["settings"], "targets": targets})


def test_export_digits_pinned(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    out = tmp_path / "digits-export.onnx"
    code, _, err = run_main(["export", "--model", "digits", "--out", out])
    assert code == 0, err
    m = json.loads(out.with_name(out.name + ".json").read_text())
    # the file names no path of this install (the exporter's per-node stack traces are stripped), so the same model
    # exported from two checkouts is the same file
    src_root = str(Path(__import__("ditdeploy").__file__).resolve().parent.parent).encode()
    assert src_root not in out.read_bytes() and b"pkg.torch.onnx.stack_trace" not in out.read_bytes()
    _pin("export", {"sha256_onnx": _sha(out), "parity": m["parity"], "graph": m["graph"], "io": m["io"],
                    "batch": m["batch"], "source_checkpoint": m["source_checkpoint"], "precision": m["precision"],
                    "opset": m["opset"], "weight_bytes": m["weight_bytes"]})
