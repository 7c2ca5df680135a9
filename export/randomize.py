"""Random weights for benchmarking and export tests (``ditdeploy export --random-weights``).

The official initialisation zeroes the adaLN-Zero modulation and the output layer, so a freshly built DiT outputs
exactly 0 and every block is gated off: useless for parity checks (0 vs 0) and for judging FP16 error. This fills
every all-zero parameter: matrices with xavier-uniform (as the other linears), vectors with N(0, bias_std). The
result is deterministic for a given seed.
"""

from __future__ import annotations

import torch
from torch import nn


def randomize_weights(model: nn.Module, seed: int = 0, bias_std: float = 0.1) -> nn.Module:
    """Fill all-zero parameters of ``model`` in place (deterministic per ``seed``); returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed" or p.numel() == 0 or bool(p.any()):
                continue
            if p.dim() >= 2:
                nn.init.xavier_uniform_(p.view(p.shape[0], -1), generator=gen)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * bias_std)
    return model


def random_model(variant: str, image_size: int = 256, seed: int = 0, **overrides):
    """A named variant (or ``DiTConfig``) with deterministic random weights (see module doc)."""
    from ditdeploy.models import create_model

    torch.manual_seed(seed)
    model = create_model(variant, image_size=image_size, **overrides)
    return randomize_weights(model, seed=seed).eval()
