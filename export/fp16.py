"""FP16 DiT with float32 islands, for a strongly typed FP16 ONNX (TensorRT 10 strongly typed / TensorRT 11).

Converting a dynamo-exported fp32 graph afterwards (onnxconverter-common) produced graphs ONNX Runtime refused to
load, so precision is decided here, in torch, before export: ``HalfDiT`` wraps a ``ditdeploy.models.DiT`` and runs
its GEMMs (patch embed, qkv, attention matmuls, proj, fc1, fc2, cross-attention) in float16 while the parts listed
in ``Fp16Policy`` stay float32. Its I/O is the denoiser contract's: x float32, t/y int64, output float32, so the
exported graph is a drop-in replacement for the fp32 one with the precision baked in as typed tensors and Casts.

The timestep sinusoid is always float32 (t * freq reaches ~1000 rad, where fp16 spacing is 0.5).
Weights of the fp32 parts are shared with the wrapped model (no copy); fp16 parts are converted copies.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ditdeploy.models import DiT, timestep_embedding

F16, F32 = torch.float16, torch.float32


@dataclass(frozen=True)
class Fp16Policy:
    """Which parts of the DiT stay float32 in the FP16 graph (everything else runs in float16).

    cond_fp32:     conditioning path: timestep MLP, label table, c = t_emb + y_emb, the adaLN modulation linears and
                   the modulate/gate arithmetic (all on N rows, not N*T tokens: cheap).
    norm_fp32:     LayerNorm statistics and output in float32 (input cast up, output cast down for the next GEMM).
    residual_fp32: the residual stream (token activations between blocks) and its gated adds in float32.
    softmax_fp32:  attention softmax in float32 (scores are fp16 GEMM outputs, cast up/down around the softmax).
    final_fp32:    the final layer (norm, modulation, output linear) entirely in float32.
    embed_fp32:    the patch embedding (a C*p*p -> hidden GEMM: negligible cost) and the input x in float32.
    adaln_weights_fp32: store (and run) the adaLN modulation linears in float32. They are a third of XL/2's
                   weights (28 x 1152 x 6912): fp32 costs 0.9 GB more and doubles their memory traffic, for an
                   error gain the measurements do not show (docs/export.md ## Export), so by default they are fp16 GEMVs
                   whose outputs (shift/scale/gate) are cast to float32 for the modulation arithmetic.
    fp32_blocks:   indices of transformer blocks computed entirely in float32 (negative indices count from the end).
    """

    cond_fp32: bool = True
    norm_fp32: bool = True
    residual_fp32: bool = True
    softmax_fp32: bool = False
    final_fp32: bool = True
    embed_fp32: bool = True
    adaln_weights_fp32: bool = False
    fp32_blocks: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fp32_blocks"] = list(self.fp32_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fp16Policy:
        d = dict(d)
        d["fp32_blocks"] = tuple(d.get("fp32_blocks", ()))
        return cls(**d)


# Everything in fp16 except the (always fp32) sinusoid: the naive baseline used for comparison.
PURE_FP16 = Fp16Policy(cond_fp32=False, norm_fp32=False, residual_fp32=False, softmax_fp32=False, final_fp32=False,
                        embed_fp32=False)
DEFAULT_POLICY = Fp16Policy()


def _cast_linear(lin: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    """``lin`` itself if it already has ``dtype`` (shared weights), else a converted frozen copy."""
    if lin.weight.dtype == dtype:
        return lin
    new = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
    new.weight = nn.Parameter(lin.weight.detach().to(dtype), requires_grad=False)
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.detach().to(dtype), requires_grad=False)
    return new


class _Norm(nn.Module):
    """LayerNorm computed in ``dtype`` (affine parameters, when present, converted to it)."""

    def __init__(self, ln: nn.LayerNorm, dtype: torch.dtype):
        super().__init__()
        self.eps = ln.eps
        self.shape = tuple(ln.normalized_shape)
        self.dtype = dtype
        w = ln.weight.detach().to(dtype) if ln.weight is not None else None
        b = ln.bias.detach().to(dtype) if ln.bias is not None else None
        self.weight = nn.Parameter(w, requires_grad=False) if w is not None else None
        self.bias = nn.Parameter(b, requires_grad=False) if b is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.to(self.dtype), self.shape, self.weight, self.bias, self.eps)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_dtype: torch.dtype) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, T, d); q and k pre-scaled by d**-0.25 each (fp16 headroom)."""
    s = q.shape[-1] ** -0.25
    scores = (q * s) @ (k * s).transpose(-2, -1)
    p = torch.softmax(scores.to(softmax_dtype), dim=-1).to(v.dtype)
    return p @ v


class _HalfBlock(nn.Module):
    """A ``DiTBlock`` evaluated with per-part dtypes (gemm/norm/cond/residual)."""

    def __init__(self, blk: nn.Module, policy: Fp16Policy, all_fp32: bool):
        super().__init__()
        self.conditioning = blk.conditioning
        g = F32 if all_fp32 else F16
        self.gd = g
        self.nd = F32 if (all_fp32 or policy.norm_fp32) else F16
        self.md = F32 if (all_fp32 or policy.cond_fp32) else F16
        self.rd = F32 if (all_fp32 or policy.residual_fp32) else F16
        self.sd = F32 if (all_fp32 or policy.softmax_fp32) else g
        self.heads = blk.attn.num_heads
        self.qkv = _cast_linear(blk.attn.qkv, g)
        self.proj = _cast_linear(blk.attn.proj, g)
        self.fc1 = _cast_linear(blk.mlp.fc1, g)
        self.fc2 = _cast_linear(blk.mlp.fc2, g)
        self.norm1 = _Norm(blk.norm1, self.nd)
        self.norm2 = _Norm(blk.norm2, self.nd)
        if self.conditioning == "cross-attn":
            self.norm_cross = _Norm(blk.norm_cross, self.nd)
            self.cq = _cast_linear(blk.cross_attn.q, g)
            self.ckv = _cast_linear(blk.cross_attn.kv, g)
            self.cproj = _cast_linear(blk.cross_attn.proj, g)
        if self.conditioning in ("adaln-zero", "adaln"):
            wd = F32 if (all_fp32 or (policy.cond_fp32 and policy.adaln_weights_fp32)) else F16
            self.ada = _cast_linear(blk.adaLN_modulation[1], wd)

    def _self_attn(self, h: torch.Tensor) -> torch.Tensor:
        b, n, c = h.shape
        qkv = self.qkv(h.to(self.gd)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        o = _attend(q, k, v, self.sd)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))

    def _cross_attn(self, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, n, c = h.shape
        m, d = ctx.shape[1], c // self.heads
        q = self.cq(h.to(self.gd)).reshape(b, n, self.heads, d).transpose(1, 2)
        k, v = self.ckv(ctx.to(self.gd)).reshape(b, m, 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        o = _attend(q, k, v, self.sd)
        return self.cproj(o.transpose(1, 2).reshape(b, n, c))

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h.to(self.gd)), approximate="tanh"))

    def _modulation(self, c: torch.Tensor) -> torch.Tensor:
        """adaLN regression ``Linear(SiLU(c))`` in the weights' dtype, returned in the modulation dtype."""
        return self.ada(F.silu(c.to(self.md)).to(self.ada.weight.dtype)).to(self.md)

    def _mod(self, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return h.to(self.md) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        x = x.to(self.rd)
        if self.conditioning == "adaln-zero":
            sh1, sc1, g1, sh2, sc2, g2 = self._modulation(c).chunk(6, dim=1)
            a = self._self_attn(self._mod(self.norm1(x), sh1, sc1))
            x = x + (g1.unsqueeze(1) * a.to(self.md)).to(self.rd)
            m = self._mlp(self._mod(self.norm2(x), sh2, sc2))
            return x + (g2.unsqueeze(1) * m.to(self.md)).to(self.rd)
        if self.conditioning == "adaln":
            sh1, sc1, sh2, sc2 = self._modulation(c).chunk(4, dim=1)
            x = x + self._self_attn(self._mod(self.norm1(x), sh1, sc1)).to(self.rd)
            return x + self._mlp(self._mod(self.norm2(x), sh2, sc2)).to(self.rd)
        x = x + self._self_attn(self.norm1(x)).to(self.rd)
        if self.conditioning == "cross-attn":
            x = x + self._cross_attn(self.norm_cross(x), ctx).to(self.rd)
        return x + self._mlp(self.norm2(x)).to(self.rd)


class HalfDiT(nn.Module):
    """Mixed-precision view of a ``DiT``: ``forward(x f32, t i64, y i64) -> f32`` with fp16 GEMMs per ``policy``."""

    def __init__(self, model: DiT, policy: Fp16Policy = DEFAULT_POLICY):
        super().__init__()
        self.policy = policy
        self.config = model.config
        self.conditioning = model.conditioning
        self.patch = model.patch_size
        self.out_channels = model.out_channels
        depth = len(model.blocks)
        fp32_blocks = {i % depth for i in policy.fp32_blocks}
        self.cd = F32 if policy.cond_fp32 else F16
        self.rd = F32 if policy.residual_fp32 else F16
        conv = model.x_embedder.proj
        self.ed = F32 if policy.embed_fp32 else F16
        if self.ed == F32:
            self.patch_proj = conv
        else:
            self.patch_proj = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                        device="meta")
            self.patch_proj.weight = nn.Parameter(conv.weight.detach().half(), requires_grad=False)
            self.patch_proj.bias = nn.Parameter(conv.bias.detach().half(), requires_grad=False)
        self.register_buffer("pos_embed", model.pos_embed.detach().to(self.rd), persistent=False)
        self.t_fc1 = _cast_linear(model.t_embedder.mlp[0], self.cd)
        self.t_fc2 = _cast_linear(model.t_embedder.mlp[2], self.cd)
        self.t_dim = model.t_embedder.frequency_embedding_size
        table = model.y_embedder.embedding_table
        self.y_table = table if self.cd == F32 else nn.Embedding.from_pretrained(table.weight.detach().half())
        self.blocks = nn.ModuleList(
            [_HalfBlock(b, policy, all_fp32=i in fp32_blocks) for i, b in enumerate(model.blocks)]
        )
        fl = model.final_layer
        self.fd = F32 if policy.final_fp32 else F16
        self.fmd = F32 if (policy.final_fp32 or policy.cond_fp32) else F16
        self.final_adaptive = fl.adaptive
        self.final_norm = _Norm(fl.norm_final, F32 if (policy.final_fp32 or policy.norm_fp32) else F16)
        self.final_linear = _cast_linear(fl.linear, self.fd)
        if fl.adaptive:
            fwd = F32 if (policy.final_fp32 or (policy.cond_fp32 and policy.adaln_weights_fp32)) else F16
            self.final_ada = _cast_linear(fl.adaLN_modulation[1], fwd)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, trace: list | None = None) -> torch.Tensor:
        """Denoiser forward; ``trace`` (eager only) collects each block's output as float32 for error analysis."""
        h = self.patch_proj(x.to(self.ed)).flatten(2).transpose(1, 2)
        h = h.to(self.rd) + self.pos_embed
        temb = timestep_embedding(t, self.t_dim)  # float32 always
        t_emb = self.t_fc2(F.silu(self.t_fc1(temb.to(self.cd))))
        y_emb = self.y_table(y)
        c = t_emb + y_emb.to(t_emb.dtype)
        n_tokens = h.shape[1]
        ctx = None
        if self.conditioning == "in-context":
            h = torch.cat([h, t_emb.unsqueeze(1).to(h.dtype), y_emb.unsqueeze(1).to(h.dtype)], dim=1)
        elif self.conditioning == "cross-attn":
            ctx = torch.stack([t_emb, y_emb.to(t_emb.dtype)], dim=1)
        for blk in self.blocks:
            h = blk(h, c, ctx)
            if trace is not None:
                trace.append(h.detach().float())
        h = h[:, :n_tokens]
        h = self.final_norm(h)
        if self.final_adaptive:
            cin = F.silu(c.to(self.fmd)).to(self.final_ada.weight.dtype)
            shift, scale = self.final_ada(cin).to(self.fmd).chunk(2, dim=1)
            h = h.to(self.fmd) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        out = self.final_linear(h.to(self.fd))
        return self._unpatchify(out).float()

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, _ = x.shape
        p, c = self.patch, self.out_channels
        g = math.isqrt(tokens)
        x = x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, g * p, g * p)


def block_errors(model: DiT, policy: Fp16Policy, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> dict:
    """Per-block rel-L2 of ``HalfDiT(model, policy)`` vs the fp32 model (torch eager), plus the end-to-end error.

    Block outputs of the fp32 model are captured with forward hooks; the half model records its own via ``trace``.
    """
    from ditdeploy.proof.distances import rel_l2

    ref_blocks: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: ref_blocks.append(o.detach().float())) for b in model.blocks]
    try:
        with torch.inference_mode():
            ref = model(x, t, y)
    finally:
        for hk in hooks:
            hk.remove()
    half = HalfDiT(model, policy).eval()
    trace: list[torch.Tensor] = []
    with torch.inference_mode():
        out = half(x, t, y, trace=trace)
    per_block = [rel_l2(a.numpy(), r.numpy()) for a, r in zip(trace, ref_blocks, strict=True)]
    return {"policy": policy.to_dict(), "per_block_rel_l2": per_block, "end_to_end_rel_l2": rel_l2(out.numpy(), ref.numpy()),
            "residual_absmax_per_block": [float(r.abs().max()) for r in ref_blocks]}
