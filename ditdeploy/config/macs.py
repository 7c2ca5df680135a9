"""Multiply-accumulate counts of the DiT denoiser per batch row, in pure Python.

Pure Python makes them usable on the torch-free deploy path.

Counted: every matmul/linear/conv (patch embed, timestep MLP, adaLN linears, qkv, attention scores and values,
proj, fc1, fc2, final layer). Not counted: norms, activations, softmax and elementwise work (a few % at most).
XL/2 at 256 gives 118.6 GMACs per full forward, the DiT paper's 118.6 "Gflops" (which are multiply-adds). A
light (feature-reuse) step runs the patch embed, timestep MLP, two gate chunks per block and the final layer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["full_macs", "light_macs", "spent_gmacs"]


def _shape(cfg: Any) -> tuple[int, int, int, int, int]:
    d = int(cfg.hidden_size)
    tokens = (int(cfg.input_size) // int(cfg.patch_size)) ** 2
    patch_in = int(cfg.in_channels) * int(cfg.patch_size) ** 2
    out_c = int(cfg.in_channels) * (2 if cfg.learn_sigma else 1)
    return d, tokens, patch_in, int(cfg.patch_size) ** 2 * out_c, int(cfg.depth)


def _outside_blocks(cfg: Any) -> int:
    d, tokens, patch_in, patch_out, _ = _shape(cfg)
    t_mlp = 256 * d + d * d
    final = d * 2 * d + tokens * d * patch_out
    return tokens * patch_in * d + t_mlp + final


def full_macs(cfg: Any) -> int:
    """Multiply-adds of one full forward for one batch row of a DiT with config ``cfg`` (adaLN-Zero)."""
    d, tokens, _, _, depth = _shape(cfg)
    mlp_hidden = int(d * float(cfg.mlp_ratio))
    block = d * 6 * d + tokens * d * 3 * d + 2 * tokens * tokens * d + tokens * d * d + 2 * tokens * d * mlp_hidden
    return _outside_blocks(cfg) + depth * block


def light_macs(cfg: Any) -> int:
    """Multiply-adds of one light (cached-features) step for one batch row."""
    d, _, _, _, depth = _shape(cfg)
    return _outside_blocks(cfg) + depth * 2 * d * d


def spent_gmacs(cfg: Any, full_rows: int, light_rows: int = 0) -> float:
    """GMACs actually spent by ``full_rows`` full and ``light_rows`` light denoiser rows."""
    return (full_rows * full_macs(cfg) + light_rows * light_macs(cfg)) / 1e9
