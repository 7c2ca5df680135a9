"""ONNX denoiser export: parity vs torch (independently re-measured), graph contract, fp16, external data, manifest,
atomicity. Tiny configs keep the dynamo exporter (~10 CPU-s per export) affordable; S/2 runs once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ditdeploy.artifact.files import manifest_path, sha256_file
from ditdeploy.artifact.manifest import load_manifest
from ditdeploy.config.variants import DIGITS, DiTConfig
from ditdeploy.errors import ArtifactError, DitDeployError, NumericsError
from ditdeploy.export.onnx import export_denoiser_onnx
from ditdeploy.export.randomize import randomize_weights
from ditdeploy.models import create_model
from ditdeploy.proof.distances import cosine, rel_l2


def tiny_config(conditioning: str = "adaln-zero", **kw) -> DiTConfig:
    base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                variant="tiny", conditioning=conditioning)
    base.update(kw)
    return DiTConfig(**base)


def tiny_model(conditioning: str = "adaln-zero", seed: int = 0, **kw):
    torch.manual_seed(seed)
    return randomize_weights(create_model(tiny_config(conditioning, **kw)), seed=seed).eval()


def independent_parity(path: Path, model, batch_sizes=(1, 3), seed: int = 1234) -> list[dict]:
    """Fresh ORT session on the written file vs the torch model, on inputs unlike the exporter's own."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    res = []
    for b in batch_sizes:
        x = rng.standard_normal((b, cfg.in_channels, cfg.input_size, cfg.input_size)).astype(np.float32)
        t = rng.integers(0, 1000, size=b).astype(np.int64)
        t[0] = 999
        y = rng.integers(0, cfg.num_classes, size=b).astype(np.int64)
        y[-1] = cfg.null_class
        with torch.no_grad():
            ref = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
        got = sess.run(["out"], {"x": x, "t": t, "y": y})[0]
        assert got.shape == ref.shape == (b, cfg.out_channels, cfg.input_size, cfg.input_size)
        assert np.abs(ref).mean() > 1e-2, "reference output is ~0: random weights did not reach the output"
        res.append({"batch": b, "rel_l2": rel_l2(got, ref), "cosine": cosine(got, ref)})
    return res


def check_graph_contract(path: Path, cfg: DiTConfig) -> onnx.ModelProto:
    m = onnx.load(str(path), load_external_data=False)
    assert m.opset_import[0].version >= 17
    ins = {i.name: i for i in m.graph.input}
    assert list(ins) == ["x", "t", "y"]
    assert [o.name for o in m.graph.output] == ["out"]
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    assert ins["x"].type.tensor_type.elem_type == f32
    assert ins["t"].type.tensor_type.elem_type == i64 and ins["y"].type.tensor_type.elem_type == i64
    assert m.graph.output[0].type.tensor_type.elem_type == f32
    for v in [*m.graph.input, *m.graph.output]:
        assert v.type.tensor_type.shape.dim[0].dim_param == "batch"
    xd = [d.dim_value for d in ins["x"].type.tensor_type.shape.dim[1:]]
    assert xd == [cfg.in_channels, cfg.input_size, cfg.input_size]
    od = [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim[1:]]
    assert od == [cfg.out_channels, cfg.input_size, cfg.input_size]
    ops = [n.op_type for n in m.graph.node]
    # one LayerNormalization node per norm: 2 per block (+1 cross-attn norm) + the final norm
    per_block = 3 if cfg.conditioning == "cross-attn" else 2
    assert ops.count("LayerNormalization") == per_block * cfg.depth + 1
    assert "Einsum" not in ops  # unpatchify rewritten to Transpose
    meta = {p.key: p.value for p in m.metadata_props}
    assert DiTConfig.from_json(meta["ditdeploy.config"]) == cfg
    return m


@pytest.mark.parametrize("conditioning", ["adaln-zero", "adaln", "in-context", "cross-attn"])
def test_fp32_all_conditionings(tmp_path, conditioning):
    model = tiny_model(conditioning)
    out = tmp_path / f"{conditioning}.onnx"
    man = export_denoiser_onnx(model, out)
    check_graph_contract(out, model.config)
    # the export's own check: two batch sizes, timesteps spread over 0..999, the null class present
    par = man["parity"]
    assert [b["batch"] for b in par["batches"]] == [1, 3]
    ts = sum((b["t"] for b in par["batches"]), [])
    assert min(ts) == 0 and max(ts) == 999
    assert any(model.config.null_class in b["y"] for b in par["batches"])
    assert par["worst"]["rel_l2"] <= 1e-4 and man["verified"] is True
    # independent re-measurement from the single file at batch 1 and 3
    for r in independent_parity(out, model):
        assert r["rel_l2"] <= 1e-4, r
        assert r["cosine"] >= 0.99999
    assert man["config"]["conditioning"] == conditioning
    assert man["kind"] == "denoiser" and man["format"] == "onnx" and man["precision"] == "fp32"
    assert not model.training


def test_s2_fp32_parity_and_manifest(tmp_path):
    torch.manual_seed(0)
    model = randomize_weights(create_model("S/2")).eval()
    out = tmp_path / "s2.onnx"
    man = export_denoiser_onnx(model, out, source={"kind": "random", "seed": 0})
    check_graph_contract(out, model.config)
    for r in independent_parity(out, model):
        assert r["rel_l2"] <= 1e-4, r
    assert man["source"] == {"kind": "random", "seed": 0}
    m = load_manifest(out)  # verifies every sha256
    assert m["files"]["s2.onnx"]["sha256"] == sha256_file(out)
    assert m["opset"] == 18 and m["config"]["variant"] == "S/2"
    assert m["external_data"] is None and not out.with_name("s2.onnx.data").exists()
    assert m["weight_bytes"] > 0.9 * 4 * model.config.param_count()
    assert m["peak_rss_bytes"] > m["weight_bytes"]
    for k in ("torch", "onnx", "onnxruntime"):
        assert k in m["tools"]
    assert set(m["timings"]) >= {"export_s", "save_s", "verify_s", "total_s"}


def test_digits_config(tmp_path):
    """The shipped model's architecture (pixel space, 1 channel, 10 classes, null id 10)."""
    torch.manual_seed(0)
    model = randomize_weights(create_model(DIGITS)).eval()
    out = tmp_path / "digits.onnx"
    man = export_denoiser_onnx(model, out)
    check_graph_contract(out, DIGITS)
    assert man["config"]["space"] == "pixel" and man["config"]["num_classes"] == 10
    assert any(10 in b["y"] for b in man["parity"]["batches"])
    for r in independent_parity(out, model):
        assert r["rel_l2"] <= 1e-4, r


def test_external_data_single_relative_file(tmp_path):
    model = tiny_model()
    d = tmp_path / "a"
    out = d / "ext.onnx"
    man = export_denoiser_onnx(model, out, external_data_threshold=0)
    data = d / "ext.onnx.data"
    assert data.exists() and man["external_data"] == "ext.onnx.data"
    assert set(man["files"]) == {"ext.onnx", "ext.onnx.data"}
    assert man["files"]["ext.onnx.data"]["sha256"] == sha256_file(data)
    m = onnx.load(str(out), load_external_data=False)
    locations = set()
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            locations.add({e.key: e.value for e in init.external_data}["location"])
    assert locations == {"ext.onnx.data"}  # one file, relative name
    assert out.stat().st_size < data.stat().st_size
    # moved elsewhere (and loaded from another cwd) it still resolves its data from the model path
    moved = tmp_path / "b"
    d.rename(moved)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for r in independent_parity(moved / "ext.onnx", model):
            assert r["rel_l2"] <= 1e-4
    finally:
        os.chdir(cwd)
    load_manifest(moved / "ext.onnx")
    # a corrupted data file is caught by the manifest
    with open(moved / "ext.onnx.data", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_manifest(moved / "ext.onnx")


def test_failed_verification_leaves_nothing(tmp_path):
    model = tiny_model()
    fresh = tmp_path / "fresh"
    # an impossible tolerance stands in for a wrong graph: the export must fail and write nothing
    with pytest.raises(NumericsError, match="differs from torch"):
        export_denoiser_onnx(model, fresh / "m.onnx", tolerance={"rel_l2": 1e-12}, external_data_threshold=0)
    assert sorted(p.name for p in fresh.iterdir()) == []  # no model, data, manifest or temp dir
    # a failed re-export over an existing artifact leaves the old one intact (and --no-verify is recorded)
    out = tmp_path / "m.onnx"
    with pytest.warns(UserWarning, match="verification skipped"):
        export_denoiser_onnx(model, out, verify=False)
    m = json.loads(manifest_path(out).read_text())
    assert m["verified"] is False and m["parity"] is None
    before = {p.name: sha256_file(p) for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(NumericsError):
        export_denoiser_onnx(tiny_model(seed=1), out, tolerance={"rel_l2": 1e-12})
    assert {p.name: sha256_file(p) for p in tmp_path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "m.onnx", "m.onnx.json"]


def test_opset17(tmp_path):
    model = tiny_model()
    out = tmp_path / "o17.onnx"
    man = export_denoiser_onnx(model, out, opset=17)
    m = check_graph_contract(out, model.config)
    assert m.opset_import[0].version == 17
    assert all(not any(a.name == "num_outputs" for a in n.attribute) for n in m.graph.node if n.op_type == "Split")
    assert man["parity"]["worst"]["rel_l2"] <= 1e-4


def test_bad_arguments(tmp_path):
    model = tiny_model()
    with pytest.raises(DitDeployError, match="int8"):
        export_denoiser_onnx(model, tmp_path / "a.onnx", precision="int8")
    with pytest.raises(DitDeployError, match="opset"):
        export_denoiser_onnx(model, tmp_path / "a.onnx", opset=16)
    with pytest.raises(DitDeployError, match=r"\.onnx"):
        export_denoiser_onnx(model, tmp_path / "a.bin")
    with pytest.raises(DitDeployError, match="DiT"):
        export_denoiser_onnx(torch.nn.Linear(2, 2), tmp_path / "a.onnx")
    assert list(tmp_path.iterdir()) == []


def test_streaming_save_equals_onnx_ir_save(tmp_path):
    """The inline writer (weights streamed from tensor memory) produces exactly what onnx_ir.save produces."""
    import onnx_ir as ir

    from ditdeploy.export.fp16 import HalfDiT
    from ditdeploy.export.onnx import dynamo_export, save_inline_streaming

    model = tiny_model("cross-attn")
    half = HalfDiT(model).eval()  # fp16 and fp32 initializers, int64 constants
    args = (torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), torch.tensor([0, 10]))
    dyn = {"x": {0: "batch"}, "t": {0: "batch"}, "y": {0: "batch"}, "out": {0: "batch"}}
    m = dynamo_export(half, args, ("x", "t", "y"), ("out",), dyn, 18)
    save_inline_streaming(m, tmp_path / "a.onnx")
    ir.save(m, tmp_path / "b.onnx")
    a, b = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    onnx.checker.check_model(a, full_check=True)
    assert a == b
    assert {i.data_type for i in a.graph.initializer} >= {onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT}


def test_release_model_frees_weights(tmp_path):
    model = tiny_model()
    man = export_denoiser_onnx(model, tmp_path / "r.onnx", release_model=True)
    assert man["parity"]["worst"]["rel_l2"] <= 1e-4  # references were computed before the weights went
    assert all(p.device.type == "meta" for p in model.parameters())
