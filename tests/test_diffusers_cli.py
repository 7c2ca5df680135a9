"""One command from a diffusers snapshot to a pipeline, class names, and the reverse (``--fmt diffusers``).

Tiny random snapshots built in-process (tests/diffusers_snapshots.py); no network (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_main
from diffusers_snapshots import ID2LABEL, save_snapshot, tiny_transformer

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``ditdeploy export --checkpoint SNAP/ --out t.onnx``: denoiser + the snapshot's vae/ decoder (~1 min)."""
    d = tmp_path_factory.mktemp("hfcli")
    snap = save_snapshot(d / "DiT-tiny", tiny_transformer(seed=5))
    code, out, err = run_main(["export", "--checkpoint", snap, "--out", d / "t.onnx"])
    assert code == 0, err
    return d, snap


def test_export_records_decoder_labels_and_source(exported):
    d, snap = exported
    m = json.loads((d / "t.onnx.json").read_text())
    assert m["decoder"] == "vae_decoder.onnx" and (d / "vae_decoder.onnx").is_file()
    assert m["id2label"] == {str(k): v for k, v in ID2LABEL.items()}
    assert m["source"]["kind"] == "diffusers" and len(m["source"]["sha256"]) == 64
    assert m["config"]["num_classes"] == 8 and m["config"]["learn_sigma"] is True
    assert m["parity"]["worst"]["rel_l2"] < 1e-4  # ONNX vs the mapped torch model, fp32


def test_sample_by_name_decodes_with_nothing_else(exported, tmp_path):
    d, _ = exported
    npz = tmp_path / "s.npz"
    code, _, err = run_main(["sample", "--engine", d / "t.onnx", "--labels", "Golden Retriever, 2, white shark",
                             "--steps", "3", "--out", tmp_path / "s.png", "--npz", npz, "--no-progress"])
    assert code == 0, err
    z = np.load(npz)
    assert z["labels"].tolist() == [1, 2, 5]
    assert z["arr_0"].shape == (3, 64, 64, 3)  # decoded to pixels by the recorded vae_decoder.onnx
    assert (tmp_path / "s.png").is_file()


@pytest.mark.parametrize("spec,words", [
    ("golden retreiver", ["unknown class name", "golden retriever (1)"]),
    ("crane", ["ambiguous", "3 (crane)", "4 (crane)"]),
    ("9", ["out of range", "0..7"]),
])
def test_bad_label_names_are_one_line(exported, tmp_path, spec, words):
    d, _ = exported
    code, _, err = run_main(["sample", "--engine", d / "t.onnx", "--labels", spec, "--steps", "2",
                             "--out", tmp_path / "x.png", "--no-progress"])
    assert_one_line_error(code, err, words)
    assert not (tmp_path / "x.png").exists()


def test_check_against_the_snapshot_in_torch(exported):
    """`check` finds the torch reference through the manifest's source (the snapshot folder)."""
    d, _ = exported
    code, out, err = run_main(["check", "--engine", d / "t.onnx", "--steps", "3", "--timesteps", "3",
                               "--batch-size", "2"])
    assert code == 0, err + out


def test_no_vae_and_hub_id(tmp_path, exported):
    _, snap = exported
    code, _, err = run_main(["export", "--checkpoint", snap, "--no-vae", "--out", tmp_path / "n.onnx"])
    assert code == 0, err
    assert json.loads((tmp_path / "n.onnx.json").read_text()).get("decoder") is None
    assert not (tmp_path / "vae_decoder.onnx").exists()
    code, _, err = run_main(["export", "--checkpoint", "facebook/DiT-XL-2-256", "--out", tmp_path / "x.onnx"])
    assert_one_line_error(code, err, ["huggingface-cli download facebook/DiT-XL-2-256", "--checkpoint DiT-XL-2-256/"])
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("how", ["missing-shard", "mismatched-config"])
def test_broken_snapshot_writes_nothing(tmp_path, how):
    snap = save_snapshot(tmp_path / "s", tiny_transformer(seed=2), shard="20KB")
    t = snap / "transformer"
    if how == "missing-shard":
        sorted(t.glob("*-of-*.safetensors"))[1].unlink()
    else:
        c = json.loads((t / "config.json").read_text())
        c["patch_size"] = 4
        (t / "config.json").write_text(json.dumps(c))
    out = tmp_path / "out"
    code, _, err = run_main(["export", "--checkpoint", snap, "--out", out / "t.onnx"])
    assert_one_line_error(code, err, ["missing" if how == "missing-shard" else "shape"])
    assert not out.exists() or not any(out.iterdir())


def test_roundtrip_to_diffusers_loads_in_ditpipeline(exported, tmp_path):
    """--fmt diffusers: DiTPipeline.from_pretrained loads it (labels, vae, scheduler); its transformer equals ours
    at t=0 and differs for t>0 only by diffusers' timestep divisor (127 vs 128)."""
    from diffusers import DiTPipeline

    from ditdeploy.sources.checkpoints import load_model

    _, snap = exported
    out = tmp_path / "rt"
    code, _, err = run_main(["export", "--checkpoint", snap, "--fmt", "diffusers", "--out", out])
    assert code == 0, err
    pipe = DiTPipeline.from_pretrained(str(out))
    assert pipe.labels["golden retriever"] == 1 and pipe.vae is not None
    assert pipe.transformer.config.norm_eps == 1e-6
    ours = load_model(snap)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([0, 0, 700]), torch.tensor([1, 8, 3])
    with torch.no_grad():
        a, b = ours(x, t, y), pipe.transformer(x, timestep=t, class_labels=y).sample
        for blk in pipe.transformer.transformer_blocks:
            blk.norm1.emb.time_proj.downscale_freq_shift = 0  # the official divisor
        c = pipe.transformer(x, timestep=t, class_labels=y).sample
    assert torch.equal(a[:2], b[:2])  # t = 0: same sinusoid, same eps (1e-6 written), same weights -> identical
    assert float((a[2] - b[2]).norm() / a[2].norm()) > 1e-3
    assert torch.equal(a, c)
    m = json.loads((out / "ditdeploy_manifest.json").read_text())
    assert m["parity"]["weights_identical"] and m["parity"]["forward_rel_l2_by_timestep"][0] < 1e-6
    # guidance_scale 1: DiTPipeline hard-codes the null class 1000 (ImageNet), this model has 8 classes
    img = pipe(class_labels=[1], guidance_scale=1.0, num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 64, 64, 3)


def test_digits_to_diffusers_and_names(tmp_path):
    from diffusers import DiTPipeline

    out = tmp_path / "dg"
    code, _, err = run_main(["export", "--model", "digits", "--fmt", "diffusers", "--out", out])
    assert code == 0, err
    pipe = DiTPipeline.from_pretrained(str(out), vae=None)  # pixel space: no VAE
    assert pipe.labels == {str(i): i for i in range(10)}
    code, _, err = run_main(["export", "--model", "digits", "--fmt", "diffusers", "--out", out])
    assert_one_line_error(code, err, "already exists")


def test_digits_sample_names(tmp_path):
    npz = tmp_path / "d.npz"
    code, _, err = run_main(["sample", "--labels", "7,3", "--steps", "2", "--npz", npz, "--no-out", "--no-progress"])
    assert code == 0, err
    assert np.load(npz)["labels"].tolist() == [7, 3]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--fmt", "openvino"], ["--precision", "int8", "--int8-mode", "dynamic"]])
def test_openvino_and_int8_carry_decoder_and_labels(exported, tmp_path, extra):
    _, snap = exported
    out = tmp_path / ("t.xml" if "openvino" in extra else "t.onnx")
    code, _, err = run_main(["export", "--checkpoint", snap, "--out", out, *extra])
    assert code == 0, err
    m = json.loads(out.with_name(out.name + ".json").read_text())
    assert m["decoder"] and (tmp_path / m["decoder"]).is_file()
    assert m["id2label"]["1"] == "golden retriever"
    npz = tmp_path / "s.npz"
    code, _, err = run_main(["sample", "--engine", out, "--labels", "volcano", "--steps", "2", "--npz", npz,
                             "--no-out", "--no-progress"])
    assert code == 0, err
    assert np.load(npz)["arr_0"].shape == (1, 64, 64, 3)


def test_torch_backend_reads_the_snapshot_and_matches_onnx(exported, tmp_path):
    """`sample --engine SNAP/` runs the mapped model in torch (decoding with the snapshot's vae/); same images as
    the exported ONNX pair within fp32 tolerance."""
    d, snap = exported
    z = {}
    for name, eng in (("torch", snap), ("onnx", d / "t.onnx")):
        npz = tmp_path / f"{name}.npz"
        code, _, err = run_main(["sample", "--engine", eng, "--labels", "volcano,tench", "--steps", "3",
                                 "--npz", npz, "--no-out", "--no-progress"])
        assert code == 0, err
        z[name] = np.load(npz)
    assert z["torch"]["labels"].tolist() == [2, 0]
    diff = np.abs(z["torch"]["arr_0"].astype(int) - z["onnx"]["arr_0"].astype(int))
    assert diff.max() <= 1  # uint8 images: fp32 ONNX vs torch differ by at most one rounding step


def test_decoder_removed_when_the_denoiser_export_fails(tmp_path):
    """The snapshot's decoder is exported first (the denoiser manifest names it); if the denoiser then fails, the
    decoder files written in this run are removed, so a failed export leaves nothing."""
    from ditdeploy.export.pipeline import removed_on_failure

    dec = tmp_path / "vae_decoder.xml"
    for f in (dec, dec.with_suffix(".bin"), tmp_path / "vae_decoder.xml.json"):
        f.write_text("x")
    with pytest.raises(RuntimeError), removed_on_failure(dec):
        raise RuntimeError("denoiser export failed")
    assert list(tmp_path.iterdir()) == []
    keep = tmp_path / "vae_decoder.onnx"
    keep.write_text("x")
    with removed_on_failure(keep):
        pass
    assert keep.exists()


def test_sharded_sampling_resolves_names_in_workers(exported, tmp_path):
    d, _ = exported
    npz = tmp_path / "s.npz"
    code, _, err = run_main(["sample", "--engine", d / "t.onnx", "--labels", "golden retriever,VOLCANO,0",
                             "--shards", "2", "--steps", "2", "--npz", npz, "--out", tmp_path / "g.png",
                             "--no-progress"])
    assert code == 0, err
    assert np.load(npz)["labels"].tolist() == [1, 2, 0] and (tmp_path / "g.png").is_file()
