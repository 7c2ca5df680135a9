"""Exponential moving average of model weights (the official update: ema = decay * ema + (1 - decay) * param)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Move every parameter of ``ema`` towards ``model``'s (matched by name); ``decay=0`` copies."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    src = dict(model.named_parameters())
    dst, cur = [], []
    for name, p in ema.named_parameters():
        dst.append(p)
        cur.append(src[name].detach())
    torch._foreach_mul_(dst, decay)
    torch._foreach_add_(dst, cur, alpha=1.0 - decay)
