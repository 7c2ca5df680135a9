"""Tiny diffusers DiT snapshots built in-process (random weights, no downloads), as ``DiTPipeline.save_pretrained``
writes them, with an ``id2label`` in ``model_index.json`` like the hub's ``facebook/DiT-XL-2-256``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# a few ImageNet entries in the hub's id2label style (several comma-separated synonyms; "crane" twice)
ID2LABEL = {0: "tench, Tinca tinca", 1: "golden retriever", 2: "volcano", 3: "crane", 4: "crane",
            5: "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"}
NUM_CLASSES = 8  # classes 6 and 7 stay unnamed


def tiny_transformer(seed: int = 0, *, classes: int = NUM_CLASSES, sample_size: int = 8, layers: int = 2):
    """A random ``DiTTransformer2DModel`` (hidden 32, 2 heads, 4->8 channels) whose per-block embedders are one
    copy (as diffusers' conversion of the official weights makes them); all weights non-zero."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                              num_layers=layers, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=classes)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2)
        e0 = m.transformer_blocks[0].norm1.emb
        for blk in m.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(e0.state_dict())
    return m.eval()


def tiny_vae(seed: int = 1):
    """A small 8x-upsampling AutoencoderKL (SD VAE layout, 8/16 channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64,
    ).eval()


def save_snapshot(path: Path, transformer=None, vae=None, *, id2label=ID2LABEL, safe: bool = True,
                  shard: str | None = None) -> Path:
    """``DiTPipeline(...).save_pretrained(path)`` plus ``id2label`` in model_index.json; returns ``path``."""
    from diffusers import DDIMScheduler, DiTPipeline

    transformer = transformer if transformer is not None else tiny_transformer()
    vae = vae if vae is not None else tiny_vae()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=sched)
    pipe.save_pretrained(str(path), safe_serialization=safe)
    if shard:
        transformer.save_pretrained(str(path / "transformer"), safe_serialization=safe, max_shard_size=shard)
        single = path / "transformer" / ("diffusion_pytorch_model" + (".safetensors" if safe else ".bin"))
        if single.exists() and any((path / "transformer").glob("*.index.json")):
            single.unlink()
    if id2label is not None:
        idx = path / "model_index.json"
        m = json.loads(idx.read_text())
        m["id2label"] = {str(k): v for k, v in id2label.items()}
        idx.write_text(json.dumps(m, indent=2))
    return path
