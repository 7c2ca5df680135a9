"""Reference DiT in PyTorch, numerically identical to facebookresearch/DiT ``models.py``.

Same constructor arguments and parameter names, so an official state_dict loads with ``strict=True``. One extra
argument, ``conditioning``, selects the paper's block designs (§3.2): ``"adaln-zero"`` (the released model, default),
``"adaln"``, ``"in-context"`` and ``"cross-attn"``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditdeploy.config.variants import CONDITIONINGS, VARIANTS, DiTConfig, variant_config

__all__ = ["DiT", "DiT_models", "create_model", "get_2d_sincos_pos_embed", "timestep_embedding"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` with per-sample (N, D) shift/scale over (N, T, D) tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t*f), sin(t*f)]``, ``f = exp(-ln(max_period) * i / half)``, in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2D sin-cos positional embedding (grid_size**2, embed_dim), float64, MAE layout.

    The first half of channels encodes the grid's first meshgrid coordinate (the column index), the second half the
    row index; each half is ``[sin, cos]``.
    """
    if embed_dim % 4:
        raise ValueError("embed_dim must be divisible by 4")
    coords = np.arange(grid_size, dtype=np.float32)
    gw, gh = np.meshgrid(coords, coords)  # first output varies along columns
    return np.concatenate([_sincos_1d(embed_dim // 2, gw), _sincos_1d(embed_dim // 2, gh)], axis=1)


class PatchEmbed(nn.Module):
    """Conv patchify (N, C, H, W) -> (N, T, D); parameter names as timm's ``PatchEmbed`` (``proj``)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias (timm ``Attention`` layout: ``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Multi-head attention from tokens (queries) to a short conditioning sequence (keys/values)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        m = ctx.shape[1]
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(ctx).reshape(b, m, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (timm ``Mlp`` names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """Raw timestep (0..999) -> 256-d sinusoid (fp32) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label table with one extra row (the null class ``num_classes``) when label dropout is used."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """One transformer block; ``conditioning`` picks adaLN-Zero (official), adaLN, in-context or cross-attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, conditioning: str = "adaln-zero"):
        super().__init__()
        self.conditioning = conditioning
        adaptive = conditioning in ("adaln-zero", "adaln")
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        if conditioning == "cross-attn":
            self.norm_cross = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        if adaptive:
            n_mod = 6 if conditioning == "adaln-zero" else 4
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_mod * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditioning == "adaln-zero":
            sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
            return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))
        if self.conditioning == "adaln":
            sh1, sc1, sh2, sc2 = self.adaLN_modulation(c).chunk(4, dim=1)
            x = x + self.attn(modulate(self.norm1(x), sh1, sc1))
            return x + self.mlp(modulate(self.norm2(x), sh2, sc2))
        x = x + self.attn(self.norm1(x))
        if self.conditioning == "cross-attn":
            x = x + self.cross_attn(self.norm_cross(x), ctx)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """LayerNorm + (adaptive) shift/scale + Linear to p*p*out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaptive: bool = True):
        super().__init__()
        self.adaptive = adaptive
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.adaptive:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.linear(modulate(self.norm_final(x), shift, scale))
        return self.linear(self.norm_final(x))


class DiT(nn.Module):
    """Diffusion Transformer with the official constructor, parameter names and numerics."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        conditioning: str = "adaln-zero",
    ):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.conditioning = conditioning
        self.config = DiTConfig(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma, conditioning=conditioning, variant="custom",
        )

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, conditioning) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(
            hidden_size, patch_size, self.out_channels, adaptive=conditioning in ("adaln-zero", "adaln")
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official initialisation: xavier linears, fixed sin-cos pos_embed, zeroed adaLN-Zero and output layers."""

        def _basic_init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

        self.apply(_basic_init)
        grid = int(self.x_embedder.num_patches**0.5)
        pe = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.conditioning == "adaln-zero":  # adaLN (no zero) keeps the xavier init of its regressor
            for block in self.blocks:
                nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        if self.final_layer.adaptive:
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W), t (N,) original timesteps, y (N,) labels (``num_classes`` = null) -> (N, out_C, H, W)."""
        x = self.x_embedder(x) + self.pos_embed
        t_emb = self.t_embedder(t)
        y_emb = self.y_embedder(y, self.training)
        c = t_emb + y_emb
        ctx = None
        n_tokens = x.shape[1]
        if self.conditioning == "in-context":
            x = torch.cat([x, t_emb.unsqueeze(1), y_emb.unsqueeze(1)], dim=1)
        elif self.conditioning == "cross-attn":
            ctx = torch.stack([t_emb, y_emb], dim=1)
        for block in self.blocks:
            x = block(x, c, ctx)
        x = x[:, :n_tokens]
        x = self.final_layer(x, c)
        return self.unpatchify(x)

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, guide_all_channels: bool = False
    ) -> torch.Tensor:
        """Classifier-free guidance over a [cond; uncond] batch (official semantics).

        Both halves are evaluated on the first half's x; ``uncond + s * (cond - uncond)`` is applied to channels 0..2
        (the official quirk; ``min(3, in_channels)`` so that models with fewer channels never guide the variance) or,
        with ``guide_all_channels``, to all ``in_channels`` eps channels. The remaining channels are returned unguided.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        k = self.in_channels if guide_all_channels else min(3, self.in_channels)
        eps, rest = out[:, :k], out[:, k:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def create_model(name: str | DiTConfig, image_size: int = 256, **overrides) -> DiT:
    """Build a DiT from a variant name (``"XL/2"``, ``"digits"``) or a ``DiTConfig``."""
    from ditdeploy.system.bounds import check_model

    cfg = name if isinstance(name, DiTConfig) else variant_config(name, image_size, **overrides)
    check_model(cfg, f"a {cfg.variant} DiT")
    model = DiT(**cfg.model_kwargs())
    model.config = cfg
    return model


def _factory(key: str):
    def make(**kwargs) -> DiT:
        return DiT(**{**VARIANTS[key], **kwargs})

    make.__name__ = "DiT_" + key.replace("/", "_")
    return make


# Same mapping as the official ``DiT_models``: "DiT-XL/2" -> constructor taking DiT keyword arguments.
DiT_models = {f"DiT-{k}": _factory(k) for k in VARIANTS}
