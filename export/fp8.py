"""FP8 (E4M3) DiT for the AOTInductor export: per-output-channel weight scales, per-tensor activation scales.

Which GEMMs: the token linears (``qkv``, ``proj``, ``fc1``, ``fc2`` and the cross-attention projections), decided by
the same role rule as the INT8 path (``ditdeploy.calibration.nodes.module_role``): embedders, adaLN modulation, the
final layer and the attention core (QK^T, softmax, AV) stay in the surrounding precision.

Scales (symmetric, no zero point; E4M3's largest finite value is 448):

- weights: one scale per output channel, ``amax(|W[o, :]|) / 448``;
- activations: one scale per linear input, ``amax(|x|) / 448`` over the calibration set's inputs (the arrays
  ``ditdeploy calibrate`` writes, run through the fp32 model), so calibration values never clip.

The quantized product is ``torch._scaled_mm(q(x), q(W)^T, scale_a, scale_b)`` (row-wise scales: the activation
scale broadcast over rows, the weight scales over columns), which runs on Hopper/Ada FP8 tensor cores and also on
CPU (where the tests compare it with :func:`fake_quant_linear`, an fp32 reference of the same math).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
_TINY = 1e-12  # amax below this: an all-zero row/tensor; its scale is 1 (anything maps to 0)


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Symmetric E4M3 scale ``amax / 448`` (float32); an all-zero amax gets scale 1."""
    amax = amax.detach().float()
    return torch.where(amax > _TINY, amax / E4M3_MAX, torch.ones_like(amax))


def weight_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scales (out,) of a linear weight (out, in)."""
    return scale_from_amax(weight.detach().abs().amax(dim=1))


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` saturated to +-448 and rounded to E4M3 (round to nearest even)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def fake_quant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w_scale: torch.Tensor,
                      a_scale: torch.Tensor) -> torch.Tensor:
    """fp32 reference of an FP8 linear: dequantized E4M3 activations and weights, then an fp32 ``F.linear``."""
    xq = quantize(x, a_scale).float() * a_scale
    wq = quantize(weight, w_scale[:, None]).float() * w_scale[:, None]
    return torch.nn.functional.linear(xq, wq, None if bias is None else bias.float())


class FP8Linear(nn.Module):
    """A linear layer with E4M3 weights (per-output-channel scales) and a static per-tensor activation scale."""

    def __init__(self, lin: nn.Linear, a_scale: float):
        super().__init__()
        w = lin.weight.detach().float()
        ws = weight_scales(w)
        dev = w.device  # every buffer on the linear's device: a CPU scale beside CUDA weights fails torch.export's
        # fake-tensor device propagation and eager CUDA ``_scaled_mm`` (scale_a.device == a.device)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.register_buffer("weight_fp8", quantize(w, ws[:, None]))
        self.register_buffer("w_scale", ws.reshape(1, -1).contiguous())  # (1, out): _scaled_mm's row-wise scale_b
        self.register_buffer("a_scale", torch.tensor(float(a_scale), dtype=torch.float32, device=dev))
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xq = quantize(x2, self.a_scale)
        sa = self.a_scale.expand(x2.shape[0], 1).contiguous()  # row-wise scales must be contiguous
        out_dtype = torch.bfloat16 if x.is_cuda else torch.float32  # CUDA row-wise scaling produces bf16
        out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=sa, scale_b=self.w_scale, out_dtype=out_dtype)
        if self.bias is not None:
            out = out + self.bias.to(out_dtype)
        return out.to(x.dtype).reshape(*lead, self.out_features)


def fp8_linears(model: nn.Module, exclude: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules quantized to FP8: role ``linear`` (INT8's rule), minus ``exclude`` globs."""
    import fnmatch

    from ditdeploy.calibration.nodes import module_role

    pats = list(exclude or ())
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and module_role(name) == "linear"
            and not any(fnmatch.fnmatchcase(name, p) for p in pats)}


def activation_amax(model: nn.Module, names: Iterable[str], x: np.ndarray, t: np.ndarray, y: np.ndarray,
                    batch: int = 16) -> dict[str, float]:
    """max |input| of each named linear over the inputs ``(x, t, y)`` run through ``model`` (its own precision)."""
    mods = dict(model.named_modules())
    amax = {n: 0.0 for n in names}
    hooks = []
    for n in amax:
        def hook(_m: nn.Module, args: tuple, n: str = n) -> None:
            amax[n] = max(amax[n], float(args[0].detach().abs().max()))

        hooks.append(mods[n].register_forward_pre_hook(hook))
    dev = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for i in range(0, len(x), batch):
                model(*(torch.from_numpy(np.ascontiguousarray(a[i:i + batch])).to(dev) for a in (x, t, y)))
    finally:
        for h in hooks:
            h.remove()
    return amax


def fp8_model(model: nn.Module, amax: dict[str, float]) -> nn.Module:
    """A copy of ``model`` whose linears named in ``amax`` are :class:`FP8Linear` (activation scale amax/448)."""
    new = copy.deepcopy(model)
    for name, a in amax.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = new.get_submodule(parent_name) if parent_name else new
        lin = getattr(parent, leaf)
        setattr(parent, leaf, FP8Linear(lin, float(scale_from_amax(torch.tensor(a)))))
    return new


def calibrated_fp8(model: nn.Module, calibration: Any, exclude: Iterable[str] | None = None,
                   limit: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """FP8 copy of ``model`` with activation scales from a loaded ``CalibrationSet``; returns it and a summary for
    the manifest (calibration sha256, quantized linears, scale ranges)."""
    names = list(fp8_linears(model, exclude))
    n = len(calibration) if limit is None else min(limit, len(calibration))
    amax = activation_amax(model, names, calibration.x[:n], calibration.t[:n], calibration.y[:n])
    info = {
        "format": "e4m3fn", "weights": "per-output-channel amax/448", "activations": "per-tensor amax/448 (static)",
        "matmul": "torch._scaled_mm (row-wise scales)", "quantized_linears": len(names),
        "kept": "embedder, adaln, final, attention core (as INT8)", "calibration_samples": n,
        "calibration_sha256": getattr(calibration, "sha256", None),
        "activation_amax": {"min": min(amax.values(), default=0.0), "max": max(amax.values(), default=0.0)},
    }
    return fp8_model(model, amax), info
