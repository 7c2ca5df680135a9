"""diffusers DiT snapshots in: exact weight mapping, config -> variant, numerics vs diffusers' own forward, bad folders.

Tiny random ``DiTTransformer2DModel`` + ``AutoencoderKL`` saved by ``DiTPipeline.save_pretrained`` (diffusers 0.42,
installed); no network (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from diffusers_snapshots import ID2LABEL, NUM_CLASSES, save_snapshot, tiny_transformer

from ditdeploy.errors import ArtifactError
from ditdeploy.sources import diffusers_snapshot
from ditdeploy.sources.checkpoints import load_model

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    tr = tiny_transformer(seed=3)
    return save_snapshot(tmp_path_factory.mktemp("hf") / "DiT-tiny", tr), tr


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, 8, 8, generator=g)
    return x, torch.tensor([0, 1, 500, 999]), torch.tensor([0, 5, 7, NUM_CLASSES])  # incl. the null class


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _diffusers_aligned(tr, divisor: bool, eps: bool):
    """diffusers' model with its two numerical differences from the official DiT switched to official values."""
    m = copy.deepcopy(tr)
    for blk in m.transformer_blocks:
        if divisor:
            blk.norm1.emb.time_proj.downscale_freq_shift = 0  # sinusoid divisor half (128), not half-1 (127)
        if eps:
            blk.norm3.eps = diffusers_snapshot.OFFICIAL_LN_EPS  # MLP LayerNorm 1e-6, not config norm_eps 1e-5
    return m


@pytest.mark.parametrize("sub", ["", "transformer"])
def test_snapshot_maps_exactly_and_infers_config(snap, sub):
    path, tr = snap
    net = load_model(path / sub if sub else path)
    cfg = net.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.input_size) == (2, 32, 2, 2, 8)
    assert (cfg.num_classes, cfg.learn_sigma, cfg.in_channels, cfg.space) == (NUM_CLASSES, True, 4, "latent")
    # identity: every diffusers tensor is reproduced bit-exactly by mapping our parameters back
    back = diffusers_snapshot.from_official(net.state_dict(), cfg)
    ref = tr.state_dict()
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)
    # qkv is the concatenation of to_q/to_k/to_v (the conversion's split, inverted)
    qkv = net.state_dict()["blocks.1.attn.qkv.weight"]
    assert torch.equal(qkv[32:64], ref["transformer_blocks.1.attn1.to_k.weight"])


def test_forward_vs_diffusers_differences_are_exactly_the_documented_ones(snap):
    """Ours vs diffusers on the same weights: different (timestep divisor 127 vs 128, MLP LayerNorm eps 1e-5 vs
    1e-6); with both set to the official values in diffusers' model, the outputs are identical."""
    path, tr = snap
    net = load_model(path)
    x, t, y = _inputs()
    with torch.no_grad():
        ours = net(x, t, y)
        out = {k: _diffusers_aligned(tr, *k)(x, timestep=t, class_labels=y).sample for k in
               [(False, False), (True, False), (False, True), (True, True)]}
    assert ours.shape == (4, 8, 8, 8)  # learned sigma kept: 2C output channels
    assert torch.equal(out[(True, True)], ours)  # nothing else differs (pos_embed, attention, GELU, unpatchify)
    assert _rel(out[(False, False)], ours) > 1e-2  # the divisor changes every timestep's embedding (t > 0)
    assert 0 < _rel(out[(True, False)], ours) < 1e-5  # eps alone: small but not zero
    assert _rel(out[(False, True)], ours) > 1e-2
    # at t = 0 the sinusoid is the same for both divisors: only the eps difference remains there
    assert _rel(out[(False, False)][:1], ours[:1]) < 1e-5


def test_sharded_and_bin_weights(tmp_path, snap):
    _, tr = snap
    ref = load_model(snap[0]).state_dict()
    for safe in (True, False):
        p = save_snapshot(tmp_path / f"s{int(safe)}", tr, safe=safe, shard="20KB")
        files = sorted(f.name for f in (p / "transformer").iterdir())
        assert any(f.endswith(".index.json") for f in files) and len(files) > 3, files
        assert all(f.endswith(".safetensors" if safe else ".bin") for f in files if "-of-" in f)
        sd = load_model(p).state_dict()
        assert all(torch.equal(sd[k], ref[k]) for k in ref)
    p = save_snapshot(tmp_path / "bin", tr, safe=False)
    assert (p / "transformer" / "diffusion_pytorch_model.bin").is_file()
    assert all(torch.equal(load_model(p).state_dict()[k], ref[k]) for k in ref)


def test_snapshot_parts_located(snap):
    s = diffusers_snapshot.locate(snap[0] / "transformer")
    assert s.root == snap[0] and s.vae == snap[0] / "vae" and s.id2label == ID2LABEL
    assert len(diffusers_snapshot.snapshot_digest(s)) == 64


def _broken(tmp_path, snap, how: str):
    import shutil

    p = tmp_path / how
    shutil.copytree(snap[0], p)
    t = p / "transformer"
    if how == "no-weights":
        (t / "diffusion_pytorch_model.safetensors").unlink()
    elif how == "config-mismatch":
        c = json.loads((t / "config.json").read_text())
        c["num_layers"] = 3
        (t / "config.json").write_text(json.dumps(c))
    elif how == "heads-mismatch":
        c = json.loads((t / "config.json").read_text())
        c["attention_head_dim"] = 8
        (t / "config.json").write_text(json.dumps(c))
    elif how == "truncated":
        f = t / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[:5000])
    elif how == "bad-json":
        (p / "model_index.json").write_text("{not json")
    elif how == "not-dit":
        c = json.loads((t / "config.json").read_text())
        c["norm_type"] = "ada_norm_single"
        (t / "config.json").write_text(json.dumps(c))
    elif how == "per-block-embedders":
        from safetensors.torch import load_file, save_file

        f = t / "diffusion_pytorch_model.safetensors"
        sd = load_file(str(f))
        sd["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"] += 1e-3
        save_file(sd, str(f))
    return p


@pytest.mark.parametrize("how,words", [
    ("no-weights", ["diffusion_pytorch_model"]), ("config-mismatch", ["transformer_blocks.2"]),
    ("heads-mismatch", ["shape"]), ("truncated", ["corrupt"]), ("bad-json", ["model_index.json"]),
    ("not-dit", ["norm_type"]), ("per-block-embedders", ["per-block", "block 0"]),
])
def test_broken_snapshots_are_one_line_errors(tmp_path, snap, how, words):
    with pytest.raises(ArtifactError) as ei:
        load_model(_broken(tmp_path, snap, how))
    msg = str(ei.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_hub_id_is_refused_with_where_to_put_it():
    assert diffusers_snapshot.looks_like_hub_id("facebook/DiT-XL-2-256")
    assert not diffusers_snapshot.looks_like_hub_id("a/b/c")
    msg = str(diffusers_snapshot.hub_id_error("facebook/DiT-XL-2-256"))
    assert "huggingface-cli download facebook/DiT-XL-2-256 --local-dir DiT-XL-2-256" in msg
    assert "--checkpoint DiT-XL-2-256/" in msg


def test_ditpipeline_end_to_end_equals_ours_once_aligned(tmp_path):
    """DiTPipeline (DDIM, no x0 clipping, 10 steps, guidance 4) vs ditdeploy's sampler on the mapped weights: with
    diffusers' divisor/eps set to official and ``guide_all_channels`` (diffusers guides all 4 channels), the final
    latents agree to fp32 rounding; so the pipeline-level differences are exactly guidance channels + forward."""
    import diffusers
    import numpy as np

    from ditdeploy.diffusion import sample
    from ditdeploy.runtimes.torch import TorchDenoiser

    tr = tiny_transformer(seed=7, classes=1000)  # DiTPipeline hard-codes the null class 1000
    with torch.no_grad():
        for p in tr.parameters():
            p.mul_(0.1)
    snap = save_snapshot(tmp_path / "s", tr, id2label=None)
    den = TorchDenoiser.from_model(load_model(snap))
    labels = [1, 207, 980, 3]
    noise = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(0))

    def pipeline_latents(aligned: bool) -> np.ndarray:
        pipe = diffusers.DiTPipeline(transformer=_diffusers_aligned(tr, aligned, aligned), vae=tr_vae(),
                                     scheduler=diffusers_snapshot._scheduler(diffusers))
        pipe.set_progress_bar_config(disable=True)
        got = {}
        decode = pipe.vae.decode
        pipe.vae.decode = lambda z, *a, **k: (got.setdefault("z", z * pipe.vae.config.scaling_factor), decode(z))[1]
        pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=10,
             generator=torch.Generator().manual_seed(0), output_type="np")
        return got["z"].numpy()

    def ours(all_channels: bool) -> np.ndarray:
        return sample(den, noise.numpy(), np.array(labels), method="ddim", steps=10, cfg_scale=4.0,
                      num_classes=1000, guide_all_channels=all_channels)

    def rel(a, b) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    o_all, o_official = ours(True), ours(False)
    assert rel(pipeline_latents(True), o_all) < 1e-5
    assert rel(pipeline_latents(False), o_all) > 1e-5  # divisor 127 (and eps) left in diffusers' forward
    assert rel(o_official, o_all) > 1e-5  # official guidance (3 channels) vs diffusers' (all 4)


def tr_vae():
    from diffusers_snapshots import tiny_vae

    return tiny_vae()


def test_mistyped_paths_are_not_hub_ids():
    assert not diffusers_snapshot.looks_like_hub_id("runs/model.safetensors")
    assert not diffusers_snapshot.looks_like_hub_id("ckpt/DiT-XL-2-256x256.pt")
    assert diffusers_snapshot.looks_like_hub_id("facebook/DiT-XL-2-512")
