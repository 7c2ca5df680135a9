"""Test helper: an independent, deliberately plain re-implementation of the official DiT forward pass.

Written from the published description (facebookresearch/DiT models.py semantics, see docs/reference.md §1), not
from ``ditdeploy.models``: explicit softmax(QK^T / sqrt(d)) V attention, explicit LayerNorm / modulate / tanh-GELU,
the timestep sinusoid and 2D sin-cos position table written out, patchify and unpatchify by explicit loops. It works
on a plain ``{official name: tensor}`` state dict and computes in float64 (except the timestep sinusoid, which the
official code computes in float32 and which we reproduce in float32), so it is a stricter yardstick than another
fp32 run. Also builds official-format random state dicts by name and shape.
"""

from __future__ import annotations

import math

import numpy as np
import torch

FREQ_DIM = 256  # timestep sinusoid size in the official model


# ------------------------------------------------------------------------------------------- official state dicts


def official_param_shapes(
    *,
    input_size: int,
    patch_size: int,
    in_channels: int,
    hidden_size: int,
    depth: int,
    mlp_ratio: float = 4.0,
    num_classes: int = 1000,
    class_dropout_prob: float = 0.1,
    learn_sigma: bool = True,
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every entry of an official DiT state_dict (adaLN-Zero blocks)."""
    h, p, c = hidden_size, patch_size, in_channels
    out_c = 2 * c if learn_sigma else c
    tokens = (input_size // p) ** 2
    mlp = int(h * mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, tokens, h),
        "x_embedder.proj.weight": (h, c, p, p),
        "x_embedder.proj.bias": (h,),
        "t_embedder.mlp.0.weight": (h, FREQ_DIM),
        "t_embedder.mlp.0.bias": (h,),
        "t_embedder.mlp.2.weight": (h, h),
        "t_embedder.mlp.2.bias": (h,),
        "y_embedder.embedding_table.weight": (num_classes + (1 if class_dropout_prob > 0 else 0), h),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * h, h), b + "attn.qkv.bias": (3 * h,),
            b + "attn.proj.weight": (h, h), b + "attn.proj.bias": (h,),
            b + "mlp.fc1.weight": (mlp, h), b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (h, mlp), b + "mlp.fc2.bias": (h,),
            b + "adaLN_modulation.1.weight": (6 * h, h), b + "adaLN_modulation.1.bias": (6 * h,),
        })
    shapes.update({
        "final_layer.linear.weight": (p * p * out_c, h), "final_layer.linear.bias": (p * p * out_c,),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h), "final_layer.adaLN_modulation.1.bias": (2 * h,),
    })
    return shapes


def make_official_state_dict(seed: int = 0, **arch) -> dict[str, torch.Tensor]:
    """Random, all non-zero official-format weights (fp32) with the real sin-cos ``pos_embed``.

    Scales keep activations O(1): weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), label table ~ N(0, 1), adaLN
    regressors smaller (gates/scales of order 0.1-1) so that deep stacks stay finite.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in official_param_shapes(**arch).items():
        if name == "pos_embed":
            grid = int(round(math.sqrt(shape[1])))
            sd[name] = torch.from_numpy(sincos_pos_embed_2d(shape[2], grid)).float().unsqueeze(0)
            continue
        if name.endswith("bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        elif name.startswith("y_embedder"):
            t = torch.randn(shape, generator=g)
        else:
            fan_in = int(np.prod(shape[1:]))
            scale = 0.5 if "adaLN" in name else 1.0
            t = scale * torch.randn(shape, generator=g) / math.sqrt(fan_in)
        sd[name] = t.float()
    return sd


# ------------------------------------------------------------------------------------------------- embeddings


def timestep_sinusoid_fp32(t: torch.Tensor, dim: int = FREQ_DIM) -> torch.Tensor:
    """The official sinusoid in float32: freqs = exp(-ln(1e4) * i / (dim/2)), i < dim/2; output [cos, sin]."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32)
    freqs = torch.exp(i * (-math.log(10000.0) / half))
    arg = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def timestep_sinusoid_np(t: np.ndarray, dim: int = FREQ_DIM, divisor: float | None = None) -> np.ndarray:
    """The same in float64 numpy (``divisor`` = dim/2 officially; diffusers uses dim/2 - 1)."""
    half = dim // 2
    div = half if divisor is None else divisor
    freqs = np.exp(-np.log(10000.0) * np.arange(half, dtype=np.float64) / div)
    arg = np.asarray(t, dtype=np.float64)[:, None] * freqs[None, :]
    return np.concatenate([np.cos(arg), np.sin(arg)], axis=1)


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """MAE/DiT fixed table (grid*grid, dim), float64, by explicit loops.

    Token k = row * grid + col. Channels [0, dim/2) encode the column index, [dim/2, dim) the row index; each half is
    [sin(pos * w_j), cos(pos * w_j)] with w_j = 10000 ** (-j / (dim/4)), j < dim/4.
    """
    quarter = dim // 4
    w = np.array([10000.0 ** (-j / quarter) for j in range(quarter)])
    out = np.zeros((grid * grid, dim))
    for row in range(grid):
        for col in range(grid):
            k = row * grid + col
            for half, pos in enumerate((col, row)):
                base = half * (dim // 2)
                out[k, base:base + quarter] = np.sin(pos * w)
                out[k, base + quarter:base + 2 * quarter] = np.cos(pos * w)
    return out


# ---------------------------------------------------------------------------------------------------- forward


def _linear(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mu = x.mean(dim=-1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def _attention(x: torch.Tensor, sd: dict, prefix: str, heads: int) -> torch.Tensor:
    n, tokens, d = x.shape
    hd = d // heads
    qkv = _linear(x, sd, prefix + ".qkv")  # (N, T, 3D) laid out as [q | k | v], each heads x head_dim
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    out = torch.empty_like(q)
    for head in range(heads):
        sl = slice(head * hd, (head + 1) * hd)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)  # (N, T, T)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        weights = torch.exp(scores)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out[..., sl] = weights @ v[..., sl]
    return _linear(out, sd, prefix + ".proj")


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, T, C*p*p), tokens row-major, features in (c, i, j) order (as a conv kernel flattens)."""
    n, c, hgt, wid = x.shape
    gh, gw = hgt // p, wid // p
    tokens = []
    for r in range(gh):
        for col in range(gw):
            tokens.append(x[:, :, r * p:(r + 1) * p, col * p:(col + 1) * p].reshape(n, c * p * p))
    return torch.stack(tokens, dim=1)


def _unpatchify(tok: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """(N, T, p*p*C) with features in (i, j, c) order -> (N, C, H, W)."""
    n, t, _ = tok.shape
    g = int(round(math.sqrt(t)))
    img = torch.empty(n, c, g * p, g * p, dtype=tok.dtype)
    for r in range(g):
        for col in range(g):
            patch = tok[:, r * g + col].reshape(n, p, p, c)  # (i, j, c)
            img[:, :, r * p:(r + 1) * p, col * p:(col + 1) * p] = patch.permute(0, 3, 1, 2)
    return img


def ref_forward(
    sd: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, num_heads: int,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Official DiT forward (adaLN-Zero, eval mode) from a state dict; returns (N, out_C, H, W) in ``dtype``."""
    sd = {k: v.detach().to(dtype) for k, v in sd.items()}
    w = sd["x_embedder.proj.weight"]
    hidden, in_c, p = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out_c = sd["final_layer.linear.weight"].shape[0] // (p * p)

    h = _patchify(x.to(dtype), p) @ w.reshape(hidden, in_c * p * p).T + sd["x_embedder.proj.bias"]
    h = h + sd["pos_embed"]
    t_freq = timestep_sinusoid_fp32(t).to(dtype)
    t_emb = _linear(_silu(_linear(t_freq, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    y_emb = sd["y_embedder.embedding_table.weight"][y]
    c = t_emb + y_emb
    for i in range(depth):
        b = f"blocks.{i}."
        mod = _linear(_silu(c), sd, b + "adaLN_modulation.1")
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (mod[:, j * hidden:(j + 1) * hidden] for j in range(6))
        h = h + gate_a[:, None, :] * _attention(_modulate(_layer_norm(h), shift_a, scale_a), sd, b + "attn", num_heads)
        hidden_mlp = _gelu_tanh(_linear(_modulate(_layer_norm(h), shift_m, scale_m), sd, b + "mlp.fc1"))
        h = h + gate_m[:, None, :] * _linear(hidden_mlp, sd, b + "mlp.fc2")
    mod = _linear(_silu(c), sd, "final_layer.adaLN_modulation.1")
    shift, scale = mod[:, :hidden], mod[:, hidden:]
    h = _linear(_modulate(_layer_norm(h), shift, scale), sd, "final_layer.linear")
    return _unpatchify(h, p, out_c)


def ref_forward_with_cfg(
    sd: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, *,
    num_heads: int, guided_channels: int = 3, dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Official CFG: both halves run on the first half's x; channels < ``guided_channels`` get
    ``uncond + s * (cond - uncond)`` in both halves, the others stay as the model produced them."""
    n = x.shape[0] // 2
    x_half = x[:n]
    out = ref_forward(sd, torch.cat([x_half, x_half]), t, y, num_heads=num_heads, dtype=dtype)
    cond, uncond = out[:n], out[n:]
    result = out.clone()
    k = guided_channels
    guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
    result[:n, :k] = guided
    result[n:, :k] = guided
    return result
