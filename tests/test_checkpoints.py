"""Checkpoints: official/train/DDP/safetensors round trips, config inference, mismatch and corruption errors, and
refusal of malicious pickles (without executing them)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from official_model_ref import make_official_state_dict

from ditdeploy.config.variants import CONDITIONINGS, DIGITS, VARIANTS, DiTConfig, variant_config
from ditdeploy.errors import ArtifactError, DitDeployError
from ditdeploy.models import DiT, create_model
from ditdeploy.sources.checkpoints import (
    infer_config,
    load_model,
    read_state_dict,
    save_safetensors,
    validate_against,
)

# A small official-format model: hidden 128 (4 heads, as the digits preset), patch 2, 8x8 latents, 10 classes.
ARCH = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_classes=10)
CFG = DiTConfig(num_heads=4, variant="custom", **ARCH)


@pytest.fixture(scope="module")
def official_sd() -> dict[str, torch.Tensor]:
    return make_official_state_dict(seed=0, **ARCH)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 500, 999]), torch.tensor([1, 9, 10])


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(*_inputs())


def _reference_out(sd: dict) -> torch.Tensor:
    m = DiT(num_heads=4, **ARCH).eval()
    m.load_state_dict(sd, strict=True)
    return _out(m)


def _one_line_error(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert isinstance(exc.value, ArtifactError | DitDeployError)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ------------------------------------------------------------------------------------------------ round trips


def test_bare_state_dict_round_trip(tmp_path, official_sd):
    path = tmp_path / "DiT-custom.pt"
    torch.save(official_sd, path)
    sd, info = read_state_dict(path)
    assert _same(sd, official_sd)
    assert info["source"] == "state_dict" and info["format"] == "torch" and info["config"] is None
    model = load_model(path)
    assert not model.training
    assert model.config == CFG
    # loaded tensors are adopted as parameters: flags as in a freshly built model (pos_embed frozen)
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == [
        (n, p.requires_grad) for n, p in DiT(num_heads=4, **ARCH).named_parameters()]
    assert not model.pos_embed.requires_grad
    assert torch.equal(_out(model), _reference_out(official_sd))


def test_legacy_torch_format_loads(tmp_path, official_sd):
    path = tmp_path / "legacy.pth"
    torch.save(official_sd, path, _use_new_zipfile_serialization=False)
    sd, info = read_state_dict(path)
    assert info["format"] == "pickle" and _same(sd, official_sd)


def _train_checkpoint(official_sd: dict, args) -> tuple[dict, dict]:
    """An official train.py-style dict; "model" differs from "ema" so the choice is observable."""
    model_sd = {k: v + 1.0 if v.is_floating_point() and k != "pos_embed" else v for k, v in official_sd.items()}
    net = DiT(num_heads=4, **ARCH)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0)
    net(*_inputs()).pow(2).mean().backward()
    opt.step()
    return {"model": model_sd, "ema": official_sd, "opt": opt.state_dict(), "args": args}, model_sd


def test_train_checkpoint_prefers_ema_and_reads_namespace_args(tmp_path, official_sd):
    args = argparse.Namespace(model="DiT-S/2", image_size=64, num_classes=10, global_batch_size=256,
                              data_path="/data/imagenet", vae="ema", epochs=1400)
    ckpt, model_sd = _train_checkpoint(official_sd, args)
    path = tmp_path / "0050000.pt"
    torch.save(ckpt, path)
    sd, info = read_state_dict(path)
    assert info["source"] == "ema" and _same(sd, official_sd) and not _same(sd, model_sd)
    assert info["args"]["model"] == "DiT-S/2" and info["args"]["image_size"] == 64
    assert info["hint"] == variant_config("S/2", 64, num_classes=10)
    assert torch.equal(_out(load_model(path)), _reference_out(official_sd))

    del ckpt["ema"]
    torch.save(ckpt, path)
    sd, info = read_state_dict(path)
    assert info["source"] == "model" and _same(sd, model_sd)


def test_train_checkpoint_with_plain_dict_args_and_config(tmp_path, official_sd):
    ckpt, _ = _train_checkpoint(official_sd, {"model": "DiT-S/2", "image_size": 64})
    ckpt["config"] = dataclasses.asdict(CFG)
    ckpt["step"] = 123
    path = tmp_path / "ours.pt"
    torch.save(ckpt, path)
    sd, info = read_state_dict(path)
    assert info["source"] == "ema" and info["config"] == CFG and info["args"]["image_size"] == 64
    assert load_model(path).config == CFG


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path, official_sd, prefix):
    path = tmp_path / "ddp.pt"
    torch.save({"ema": {prefix + k: v for k, v in official_sd.items()}}, path)
    sd, info = read_state_dict(path)
    assert _same(sd, official_sd)
    assert "".join(info["prefix_stripped"]) == prefix
    assert torch.equal(_out(load_model(path)), _reference_out(official_sd))


def test_safetensors_round_trip_with_config_metadata(tmp_path, official_sd):
    model = load_model(_save_pt(tmp_path, official_sd))
    path = tmp_path / "out" / "model.safetensors"
    save_safetensors(model, path, model.config, extra_metadata={"step": 100, "note": "ema"})
    assert sorted(os.listdir(path.parent)) == ["model.safetensors"]  # atomic: no temp file left behind
    sd, info = read_state_dict(path)
    assert info["format"] == "safetensors" and info["config"] == CFG
    assert json.loads(info["metadata"]["config"]) == dataclasses.asdict(CFG)
    assert info["metadata"]["step"] == "100" and info["metadata"]["note"] == "ema"
    assert _same(sd, official_sd)
    again = load_model(path)
    assert again.config == CFG and torch.equal(_out(again), _reference_out(official_sd))


def test_safetensors_config_wins_over_shape_inference(tmp_path):
    """The digits preset has pixel space and a name: both come back from metadata (shapes alone can't tell space)."""
    model = create_model("digits")
    path = tmp_path / "digits.safetensors"
    save_safetensors(model.state_dict(), path, DIGITS)
    loaded = load_model(path)
    assert loaded.config == DIGITS and loaded.config.space == "pixel"
    assert load_model(path, "digits").config == DIGITS


def test_save_safetensors_refuses_a_config_that_does_not_describe_the_weights(tmp_path, official_sd):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(ArtifactError) as e:
        save_safetensors(official_sd, path, dataclasses.replace(CFG, num_classes=1000))
    assert "10 classes" in _one_line_error(e)
    with pytest.raises(DitDeployError):
        save_safetensors(official_sd, tmp_path / "bad.pt", CFG)
    assert os.listdir(tmp_path) == []


def test_half_precision_checkpoint_loads_as_fp32(tmp_path, official_sd):
    path = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in official_sd.items()}, path)
    model = load_model(path)
    assert model.x_embedder.proj.weight.dtype == torch.float32
    ref = _reference_out({k: v.half().float() for k, v in official_sd.items()})
    assert torch.equal(_out(model), ref)


def _save_pt(tmp_path: Path, sd: dict, name: str = "m.pt") -> Path:
    path = tmp_path / name
    torch.save(sd, path)
    return path


# ------------------------------------------------------------------------------------------------- inference


def _meta_sd(cfg: DiTConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return dict(DiT(**cfg.model_kwargs()).state_dict())


@pytest.mark.parametrize("name,px", [("S/2", 256), ("B/4", 256), ("L/8", 512), ("XL/2", 256), ("XL/2", 512)])
def test_infer_config_of_named_variants(name, px):
    cfg = variant_config(name, px)
    assert infer_config(_meta_sd(cfg)) == cfg  # shapes only: meta tensors suffice


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_infer_config_of_conditionings(conditioning):
    cfg = variant_config("S/4", 256, conditioning=conditioning)
    assert infer_config(_meta_sd(cfg)) == cfg


def test_infer_config_flags_and_hints():
    no_sigma = variant_config("B/8", 256, learn_sigma=False, num_classes=5)
    assert infer_config(_meta_sd(no_sigma)) == no_sigma
    no_null = variant_config("S/8", 256, class_dropout_prob=0.0, num_classes=7)
    assert infer_config(_meta_sd(no_null), hint=no_null) == no_null
    assert infer_config(_meta_sd(no_null)).num_classes == 6  # without the hint the last row is taken as null
    assert infer_config(_meta_sd(DIGITS)) == DIGITS
    odd = DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=96, depth=1, num_heads=3,
                    num_classes=4, variant="mine", space="pixel")
    with pytest.raises(ArtifactError) as e:
        infer_config(_meta_sd(odd))
    assert "attention heads" in _one_line_error(e)
    assert infer_config(_meta_sd(odd), hint=odd) == odd


def test_infer_config_rejects_non_dit(tmp_path):
    with pytest.raises(ArtifactError) as e:
        infer_config({"encoder.weight": torch.zeros(2, 2)})
    assert "x_embedder.proj.weight" in _one_line_error(e)
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "unet.pt")
    with pytest.raises(ArtifactError) as e:
        load_model(tmp_path / "unet.pt")
    assert _one_line_error(e).startswith("unet.pt: not a DiT state dict")


# ------------------------------------------------------------------------------------------------ mismatches


def test_variant_mismatch_names_the_real_variant():
    with pytest.raises(ArtifactError) as e:
        validate_against(variant_config("XL/2", 256), _meta_sd(variant_config("B/4", 256)))
    msg = _one_line_error(e)
    assert "DiT-B/4 at 256px" in msg and "hidden 768" in msg and "patch 4" in msg and "--model B/4" in msg


def test_image_size_and_head_mismatches():
    with pytest.raises(ArtifactError) as e:
        validate_against(variant_config("XL/2", 256), _meta_sd(variant_config("XL/2", 512)))
    assert "512px" in _one_line_error(e) and "--image-size 512" in str(e.value)
    with pytest.raises(ArtifactError) as e:
        validate_against(variant_config("S/2", 256), _meta_sd(variant_config("S/2", 256, num_classes=10)))
    assert "10 classes" in _one_line_error(e)
    with pytest.raises(ArtifactError) as e:
        validate_against(variant_config("S/2", 256), _meta_sd(variant_config("S/2", 256, learn_sigma=False)))
    assert "learn_sigma" in _one_line_error(e)
    with pytest.raises(ArtifactError) as e:
        validate_against(variant_config("S/2", 256), _meta_sd(variant_config("S/2", 256, conditioning="adaln")))
    assert "adaln conditioning" in _one_line_error(e)


def test_missing_unexpected_and_misshapen_keys_are_listed():
    cfg = variant_config("S/8", 256)
    sd = _meta_sd(cfg)
    del sd["blocks.3.attn.qkv.weight"]
    sd["blocks.3.extra.weight"] = torch.empty(2, device="meta")
    sd["blocks.5.mlp.fc2.weight"] = torch.empty(384, 100, device="meta")
    with pytest.raises(ArtifactError) as e:
        validate_against(cfg, sd)
    msg = _one_line_error(e)
    assert "missing keys blocks.3.attn.qkv.weight" in msg
    assert "unexpected keys blocks.3.extra.weight" in msg
    assert "blocks.5.mlp.fc2.weight (384, 100) vs (384, 1536)" in msg


def test_load_model_with_wrong_model_or_size(tmp_path, official_sd):
    path = _save_pt(tmp_path, official_sd)
    with pytest.raises(ArtifactError) as e:
        load_model(path, "XL/2")
    msg = _one_line_error(e)
    assert msg.startswith("m.pt: checkpoint is") and "hidden 128" in msg and "not XL/2" in msg
    with pytest.raises(ArtifactError) as e:
        load_model(path, image_size=256)
    assert "--image-size 64" in _one_line_error(e)
    s8 = tmp_path / "s8.pt"
    torch.save(create_model("S/8", 256).state_dict(), s8)
    assert load_model(s8, "S/8").config == variant_config("S/8", 256)
    assert load_model(s8, "DiT-S/8", 256).config.variant == "S/8"
    with pytest.raises(ArtifactError) as e:
        load_model(s8, "S/8", 512)
    assert "--image-size 256" in _one_line_error(e)
    with pytest.raises(ArtifactError) as e:
        load_model(s8, "B/8")
    assert "pass --model S/8" in _one_line_error(e)
    # heads of an unknown hidden size are not needed to name the mismatch
    odd = tmp_path / "odd.pt"
    torch.save(DiT(input_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10).state_dict(), odd)
    with pytest.raises(ArtifactError) as e:
        load_model(odd, "digits")
    assert "(hidden 32, patch 2, depth 1, in_channels 1), not digits" in _one_line_error(e)


# ------------------------------------------------------------------------------------------- corrupt inputs


def _expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(ArtifactError) as e:
        read_state_dict(path)
    msg = _one_line_error(e)
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_empty_and_directory(tmp_path):
    _expect_error(tmp_path / "nope.pt", "does not exist")
    (tmp_path / "empty.pt").write_bytes(b"")
    _expect_error(tmp_path / "empty.pt", "empty (0 bytes)")
    (tmp_path / "dir.pt").mkdir()
    _expect_error(tmp_path / "dir.pt", "is a directory")


def test_truncated_files(tmp_path, official_sd):
    data = _save_pt(tmp_path, official_sd).read_bytes()
    for frac in (0.5, 0.99):
        (tmp_path / "cut.pt").write_bytes(data[: int(len(data) * frac)])
        _expect_error(tmp_path / "cut.pt", "truncated or corrupt")
    legacy = tmp_path / "legacy.pt"
    torch.save(official_sd, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:5000])
    _expect_error(legacy, "corrupt or truncated")
    st = tmp_path / "m.safetensors"
    save_safetensors(official_sd, st, CFG)
    raw = st.read_bytes()
    st.write_bytes(raw[: len(raw) // 2])
    _expect_error(st, "corrupt or truncated safetensors")
    st.write_bytes(raw[:30])
    _expect_error(st)


def test_wrong_content(tmp_path):
    (tmp_path / "notes.pt").write_text("this is a text file, not weights")
    _expect_error(tmp_path / "notes.pt", "not a PyTorch or safetensors checkpoint")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x032.0")
    _expect_error(tmp_path / "model.onnx", "suffix .onnx")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    _expect_error(tmp_path / "list.pt", "holds a list")
    torch.save({"x_embedder.proj.weight": torch.zeros(2), "step": 5}, tmp_path / "mixed.pt")
    _expect_error(tmp_path / "mixed.pt", "not tensors", "'step'")
    torch.save({}, tmp_path / "nothing.pt")
    _expect_error(tmp_path / "nothing.pt", "no tensors")


def test_invalid_config_metadata(tmp_path, official_sd):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file(official_sd, str(path), metadata={"config": "{not json"})
    _expect_error(path, "invalid 'config'")


def test_numpy_pickle_is_refused(tmp_path):
    import numpy as np

    torch.save({"w": np.zeros(3)}, tmp_path / "np.pt")
    _expect_error(tmp_path / "np.pt", "refused as unsafe", "numpy")


# ---------------------------------------------------------------------------------------- malicious pickles


class _Payload:
    """Unpickling this runs code: exec() creates a marker file (harmless stand-in for an attacker's command)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _plant(tmp_path: Path, how: str) -> tuple[Path, Path]:
    marker = tmp_path / f"PWNED-{how}"
    path = tmp_path / f"evil-{how}.pt"
    evil = _Payload(marker)
    if how == "zip":
        torch.save({"x_embedder.proj.weight": torch.zeros(1), "evil": evil}, path)
    elif how == "legacy":
        torch.save({"weights": torch.zeros(1), "evil": evil}, path, _use_new_zipfile_serialization=False)
    elif how == "train-args":  # hidden where official checkpoints keep their (allow-listed) Namespace
        torch.save({"ema": {"a": torch.zeros(1)}, "args": argparse.Namespace(model=evil)}, path)
    elif how == "raw-pickle":
        path.write_bytes(pickle.dumps({"state_dict": evil}))
    return path, marker


@pytest.mark.parametrize("how", ["zip", "legacy", "train-args", "raw-pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, how):
    path, marker = _plant(tmp_path, how)
    with pytest.raises(ArtifactError) as e:
        read_state_dict(path)
    msg = _one_line_error(e)
    assert "refused as unsafe" in msg and "safetensors" in msg
    if how != "raw-pickle":
        assert "object exec" in msg or "builtins.exec" in msg
    with pytest.raises(ArtifactError):
        load_model(path)
    assert not marker.exists()


def test_planted_payload_is_live(tmp_path):
    """Control: the same file DOES run its code under plain unpickling (in a throwaway subprocess), so the refusal
    above is what protects us — not a dud payload."""
    path, marker = _plant(tmp_path, "zip")
    code = textwrap.dedent(f"""
        import torch
        torch.load({str(path)!r}, map_location="cpu", weights_only=False)
    """)
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=120)
    assert marker.exists() and marker.read_text() == "pwned"


def test_variants_table_is_what_infer_uses():
    # every named variant's hidden size maps to its head count (the heads cannot be read from weights)
    for name, v in VARIANTS.items():
        assert infer_config(_meta_sd(variant_config(name, 256))).num_heads == v["num_heads"]
