"""Feature reuse across sampling steps for the reference DiT (torch), in the spirit of FORA / Δ-DiT.

A *full* step runs every block and also returns the cache: each block's attention output and MLP output before
their adaLN-Zero gates, stacked as ``(N, 2 * depth, T, D)`` (block i's attention at ``2i``, its MLP at ``2i + 1``).
A *light* step recomputes only what depends on the current ``x``, ``t`` and ``y`` outside the blocks' attention and
MLP: the patch embedding, the timestep/label embeddings, every block's two gates and the final layer, and rebuilds
the residual stream as ``h = embed(x) + sum_i (g1_i * attn_i + g2_i * mlp_i)`` from the cached features.

``forward_with_cache`` performs exactly the operations of ``DiT.forward`` in the same order, so its ``out`` is
bit-identical to the model's; a light step right after a full step at the same inputs reproduces it to rounding.
Only the released adaLN-Zero conditioning is supported (the gates are what a light step recomputes).
"""

from __future__ import annotations

import torch
from torch import nn

from ditdeploy.errors import DitDeployError
from ditdeploy.models import modulate

__all__ = ["CacheFull", "CacheLight", "check_cacheable", "forward_from_cache", "forward_with_cache"]


def check_cacheable(model: nn.Module) -> None:
    """Raise ``DitDeployError`` unless ``model`` is a DiT with adaLN-Zero blocks."""
    if getattr(model, "conditioning", None) != "adaln-zero":
        raise DitDeployError(
            f"feature reuse needs the adaLN-Zero DiT blocks, this model uses {getattr(model, 'conditioning', None)!r}"
        )


def _embed(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    return h, c


def forward_with_cache(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's output (identical to ``model(x, t, y)`` in eval mode) and the feature cache (N, 2*depth, T, D)."""
    h, c = _embed(model, x, t, y)
    feats = []
    for blk in model.blocks:
        sh1, sc1, g1, sh2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
        a = blk.attn(modulate(blk.norm1(h), sh1, sc1))
        h = h + g1.unsqueeze(1) * a
        m = blk.mlp(modulate(blk.norm2(h), sh2, sc2))
        h = h + g2.unsqueeze(1) * m
        feats += [a, m]
    out = model.unpatchify(model.final_layer(h, c))
    return out, torch.stack(feats, dim=1)


def _gates(blk: nn.Module, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the two gate chunks (2 and 5 of 6) of a block's adaLN modulation: 1/3 of its multiply-adds."""
    lin = blk.adaLN_modulation[1]
    d = lin.out_features // 6
    s = nn.functional.silu(c)
    g1 = nn.functional.linear(s, lin.weight[2 * d:3 * d], lin.bias[2 * d:3 * d])
    g2 = nn.functional.linear(s, lin.weight[5 * d:6 * d], lin.bias[5 * d:6 * d])
    return g1, g2


def forward_from_cache(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                       cache: torch.Tensor) -> torch.Tensor:
    """A light step: the model's output with every block's attention/MLP output taken from ``cache``."""
    h, c = _embed(model, x, t, y)
    for i, blk in enumerate(model.blocks):
        g1, g2 = _gates(blk, c)
        h = h + g1.unsqueeze(1) * cache[:, 2 * i]
        h = h + g2.unsqueeze(1) * cache[:, 2 * i + 1]
    return model.unpatchify(model.final_layer(h, c))


class CacheFull(nn.Module):
    """``forward(x, t, y) -> (out, cache)``: the full graph of a two-graph export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        check_cacheable(model)
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_with_cache(self.model, x, t, y)


class CacheLight(nn.Module):
    """``forward(x, t, y, cache) -> out``: the light graph of a two-graph export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        check_cacheable(model)
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        return forward_from_cache(self.model, x, t, y, cache)
