"""The typed manifest (ditdeploy.artifact.manifest) and the shipped-asset paths (ditdeploy.sources.shipped): numpy/stdlib only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ditdeploy.artifact.files import manifest_path, write_json_atomic
from ditdeploy.artifact.manifest import BatchLimits, Manifest, load_manifest, make_manifest
from ditdeploy.config.variants import DIGITS
from ditdeploy.errors import ArtifactError
from ditdeploy.sources import shipped


def _artifact(d: Path, name: str = "m.onnx", data: bytes = b"model", **fields) -> Path:
    a = d / name
    a.write_bytes(data)
    write_json_atomic(manifest_path(a), make_manifest(a, [a], **fields))
    return a


def test_shipped_manifest_round_trip_is_byte_identical(tmp_path):
    """Load + save of the shipped model's manifest writes exactly the bytes it was read from."""
    src = manifest_path(shipped.DIGITS_ONNX)
    m = Manifest.load(shipped.DIGITS_ONNX)
    assert m.to_json().encode() == src.read_bytes()
    out = m.save(tmp_path / "copy.json")
    assert out.read_bytes() == src.read_bytes()
    assert m.kind == "denoiser" and m.format == "onnx" and m.precision == "fp32"
    assert m.config == DIGITS and m.batch == BatchLimits(1, 3, None) and m.max_batch is None


def test_unknown_fields_survive_a_round_trip(tmp_path):
    a = _artifact(tmp_path, kind="denoiser", future_field={"nested": [1, 2.5, None]}, zz_last="x")
    before = manifest_path(a).read_bytes()
    m = Manifest.load(a)
    assert m["future_field"] == {"nested": [1, 2.5, None]}
    m.save()
    assert manifest_path(a).read_bytes() == before
    assert json.loads(before) == dict(m)


def test_typed_fields_and_defaults(tmp_path):
    a = _artifact(tmp_path, kind="decoder", config={"latent_channels": 16}, batch={"min": 1, "opt": 2, "max": 8},
                  openvino={"inference_precision_hint": "bf16"}, scaling_factor=0.13025)
    m = Manifest.load(a)
    assert m.precision == "fp32"  # not recorded -> fp32
    assert m.latent_channels == 16 and m.scaling_factor == pytest.approx(0.13025)
    assert m.batch == BatchLimits(1, 2, 8) and m.max_batch == 8 and m.openvino_hint == "bf16"
    assert m.total_bytes == len(b"model") and m.section("missing") == {}
    with pytest.raises(ArtifactError, match="no model 'config'"):
        _ = Manifest.load(_artifact(tmp_path, "n.onnx", kind="denoiser")).config
    with pytest.raises(ArtifactError, match="batch.max"):
        _ = Manifest.load(_artifact(tmp_path, "b.onnx", batch={"max": "many"})).max_batch
    with pytest.raises(ArtifactError, match="expected a denoiser"):
        m.require_kind("denoiser")


def test_load_verifies_sha256_and_load_manifest_is_the_same(tmp_path):
    a = _artifact(tmp_path, kind="denoiser")
    assert isinstance(load_manifest(a), Manifest) and load_manifest(a) == Manifest.load(a)
    a.write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        Manifest.load(a)
    assert Manifest.load(a, verify=False).kind == "denoiser"
    assert Manifest.load(tmp_path / "none.onnx", required=False) is None


def test_decoder_path(tmp_path):
    a = _artifact(tmp_path, kind="denoiser", decoder="vae.onnx")
    m = Manifest.load(a)
    assert m.decoder_name == "vae.onnx"
    assert m.decoder_path() is None  # named but not there
    assert m.decoder_path(existing=False) == (tmp_path / "vae.onnx").resolve()
    (tmp_path / "vae.onnx").write_bytes(b"v")
    assert m.decoder_path() == (tmp_path / "vae.onnx").resolve()
    assert Manifest.load(_artifact(tmp_path, "p.onnx", decoder=None)).decoder_path() is None
    with pytest.raises(ArtifactError, match="outside its directory"):
        Manifest.load(_artifact(tmp_path, "evil.onnx", decoder="../vae.onnx")).decoder_path()


def test_reference_checkpoint_follows_the_source_chain(tmp_path):
    ck = tmp_path / "model.safetensors"
    ck.write_bytes(b"weights")
    fp32 = _artifact(tmp_path, "fp32.onnx", source={"kind": "checkpoint", "path": str(ck), "sha256": "x"})
    q = _artifact(tmp_path, "int8.onnx", b"q", source={"onnx": fp32.name, "precision": "fp32"})
    xml = _artifact(tmp_path, "int8.xml", b"ov", source={"onnx": q.name})
    assert Manifest.load(fp32).reference_checkpoint() == ck
    assert Manifest.load(xml).reference_checkpoint() == ck  # two hops: IR -> int8 ONNX -> fp32 ONNX -> checkpoint
    rel = _artifact(tmp_path, "rel.onnx", b"r", source_checkpoint={"name": "model.safetensors", "sha256": "x"})
    assert Manifest.load(rel).reference_checkpoint() == tmp_path / "model.safetensors"
    lost = _artifact(tmp_path, "lost.onnx", b"l", checkpoint="gone.safetensors", config={"variant": "digits"})
    assert Manifest.load(lost).reference_checkpoint() is None
    assert Manifest.load(lost).reference_checkpoint(shipped_fallback=True) == shipped.digits_checkpoint()
    other = _artifact(tmp_path, "o.onnx", b"o", config={"variant": "S/2"})
    assert Manifest.load(other).reference_checkpoint(shipped_fallback=True) is None


def test_source_checkpoint_record(tmp_path):
    m = Manifest({"source": {"checkpoint": "a.pt", "sha256": "abc"}})
    assert m.source_checkpoint() == {"checkpoint": "a.pt", "checkpoint_sha256": "abc"}
    assert Manifest({}).source_checkpoint() == {} and Manifest.of(None) == {}


def test_shipped_default_model():
    assert shipped.default_model() == shipped.DIGITS_ONNX and shipped.DIGITS_ONNX.is_file()
    assert shipped.default_model("torch") == shipped.DIGITS_CHECKPOINT
    assert shipped.ASSETS.name == "assets" and shipped.DIGITS_ONNX.parent == shipped.ASSETS


def test_derive_writes_the_lineage_and_carries_one_field_set(tmp_path):
    """Every derived artifact (INT8, OpenVINO IR, engine, INT8 decoder) gets its fields from Manifest.derive: the
    declared CARRIED set, ``source`` = {artifact, sha256, precision}, the checkpoint as ``source_checkpoint``."""
    from ditdeploy.artifact.files import sha256_file
    from ditdeploy.artifact.manifest import CARRIED

    ck = tmp_path / "model.safetensors"
    ck.write_bytes(b"weights")
    (tmp_path / "vae.onnx").write_bytes(b"vae")
    fp32 = _artifact(tmp_path, "fp32.onnx", kind="denoiser", precision="fp32", config={"variant": "digits"},
                     id2label={"0": "zero"}, decoder="vae.onnx", parity={"worst": 1e-6}, format="onnx",
                     source={"kind": "checkpoint", "path": str(ck), "sha256": "c" * 64})
    m = Manifest.load(fp32)
    d = m.derive(tmp_path / "fp32-int8.onnx", format="onnx", precision="int8")
    assert d["source"] == {"artifact": "fp32.onnx", "sha256": sha256_file(fp32), "precision": "fp32"}
    assert d["source_checkpoint"] == {"path": str(ck), "sha256": "c" * 64}  # the one spelling written
    assert d["precision"] == "int8" and d["format"] == "onnx"  # what the step changes goes on top
    assert d["id2label"] == {"0": "zero"} and d["decoder"] == "vae.onnx" and "parity" not in d
    assert set(d) - {"source", "source_checkpoint", "format"} <= set(CARRIED)
    elsewhere = m.derive(tmp_path / "sub" / "x.xml")
    assert "decoder" not in elsewhere  # the decoder is carried only when it sits beside the new artifact
    q = _artifact(tmp_path, "fp32-int8.onnx", b"q", **d)
    assert Manifest.load(q).reference_checkpoint() == ck  # read back through the lineage
    assert Manifest.load(q).derive(None)["source_checkpoint"] == d["source_checkpoint"]  # carried on
