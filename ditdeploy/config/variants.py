"""Model configurations (torch-free): the 12 official variants, the shipped ``digits`` model, and ``DiTConfig``.

A ``DiTConfig`` is the plain-data description of a model: it goes into safetensors metadata and artifact manifests,
and ``ditdeploy.models.DiT(**cfg.model_kwargs())`` rebuilds the network.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from ditdeploy.errors import DitDeployError

# depth, hidden_size, num_heads per size; patch 2/4/8 (facebookresearch/DiT models.py).
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
VARIANTS: dict[str, dict[str, int]] = {
    f"{s}/{p}": {"depth": d, "hidden_size": h, "num_heads": n, "patch_size": p}
    for s, (d, h, n) in _SIZES.items()
    for p in (2, 4, 8)
}
CONDITIONINGS = ("adaln-zero", "adaln", "in-context", "cross-attn")
LATENT_CHANNELS = 4
VAE_DOWNSAMPLE = 8  # SD VAE: 256 px -> 32x32 latents
SPACES = ("latent", "pixel")
#: the largest value any integer size of a config may take (XL/2 at 512 px: 64 latents, 1152 wide, 1000 classes);
#: memory is checked separately where a model is built (``ditdeploy.system.bounds.check_model``)
MAX_DIM = 1 << 20
_SIZES_INT = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes")


@dataclass(frozen=True)
class DiTConfig:
    """Everything needed to rebuild a DiT and to feed it: architecture plus the data space it works in."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    conditioning: str = "adaln-zero"
    variant: str = "XL/2"
    # "latent" (SD-VAE latents, decode with a VAE) or "pixel" (images in [-1, 1] directly, e.g. digits)
    space: str = "latent"

    def __post_init__(self) -> None:
        """Refuse values no DiT can have (one line): every size an integer in 1..MAX_DIM, the patch grid and heads
        dividing evenly, probabilities and ratios in range, known conditioning and space."""
        for k in _SIZES_INT:
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_DIM:
                raise DitDeployError(f"model config {k} must be an integer in 1..{MAX_DIM}, got {v!r}")
        if self.input_size % self.patch_size:
            raise DitDeployError(f"model config input_size {self.input_size} is not a multiple of patch_size "
                                 f"{self.patch_size}")
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise DitDeployError(f"model config hidden_size {self.hidden_size} must be divisible by num_heads "
                                 f"{self.num_heads} and by 4 (the sin-cos position table)")
        for k, lo, hi in (("mlp_ratio", 0.0, 64.0), ("class_dropout_prob", 0.0, 1.0)):
            v = getattr(self, k)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or not (lo < v <= hi if k == "mlp_ratio" else lo <= v < hi):
                raise DitDeployError(f"model config {k} must be a number in {'(' if k == 'mlp_ratio' else '['}"
                                     f"{lo:g}, {hi:g}{']' if k == 'mlp_ratio' else ')'}, got {v!r}")
        if not isinstance(self.learn_sigma, bool):
            raise DitDeployError(f"model config learn_sigma must be true or false, got {self.learn_sigma!r}")
        if self.conditioning not in CONDITIONINGS:
            raise DitDeployError(f"model config conditioning {self.conditioning!r}: choose one of "
                                 f"{', '.join(CONDITIONINGS)}")
        if self.space not in SPACES or not isinstance(self.variant, str):
            raise DitDeployError(f"model config space {self.space!r} / variant {self.variant!r}: space is latent "
                                 "or pixel, variant a name")

    def model_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of ``ditdeploy.models.DiT``."""
        d = dataclasses.asdict(self)
        d.pop("variant")
        d.pop("space")
        return d

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def image_size(self) -> int:
        return self.input_size * (VAE_DOWNSAMPLE if self.space == "latent" else 1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise DitDeployError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> DiTConfig:
        try:
            d = json.loads(s)
        except (TypeError, ValueError, RecursionError) as e:
            raise DitDeployError(f"model config is not readable JSON ({type(e).__name__})") from e
        if not isinstance(d, dict):
            raise DitDeployError(f"model config is a JSON {type(d).__name__}, not an object")
        return cls.from_dict(d)

    def param_count(self) -> int:
        """Analytic parameter count (trainable + pos_embed), equal to ``sum(p.numel())`` of the torch model."""
        h, p, c = self.hidden_size, self.patch_size, self.in_channels
        mlp = int(h * self.mlp_ratio)
        n = (self.input_size // p) ** 2
        total = c * p * p * h + h  # patch embed
        total += n * h  # pos_embed
        total += 256 * h + h + h * h + h  # timestep MLP
        total += (self.num_classes + (1 if self.class_dropout_prob > 0 else 0)) * h
        attn = 3 * h * h + 3 * h + h * h + h
        ff = h * mlp + mlp + mlp * h + h
        if self.conditioning == "adaln-zero":
            block = attn + ff + h * 6 * h + 6 * h
        elif self.conditioning == "adaln":
            block = attn + ff + h * 4 * h + 4 * h
        elif self.conditioning == "in-context":
            block = attn + ff + 4 * h  # two affine LayerNorms
        else:  # cross-attn: + cross attention (q, kv, proj) and a third affine LayerNorm
            block = attn + ff + 4 * h + (h * h + h) + (2 * h * h + 2 * h) + (h * h + h) + 2 * h
        total += self.depth * block
        out = p * p * self.out_channels
        if self.conditioning in ("adaln-zero", "adaln"):
            total += h * 2 * h + 2 * h + h * out + out
        else:
            total += 2 * h + h * out + out
        return total

    def macs(self) -> int:
        """Analytic multiply-accumulates of one forward pass for one sample (GEMMs + attention matmuls)."""
        h, p = self.hidden_size, self.patch_size
        n = (self.input_size // p) ** 2
        mlp = int(h * self.mlp_ratio)
        tokens = n + (2 if self.conditioning == "in-context" else 0)
        per_block = tokens * (3 * h * h + h * h + 2 * h * mlp) + 2 * tokens * tokens * h
        if self.conditioning == "adaln-zero":
            per_block += 6 * h * h
        elif self.conditioning == "adaln":
            per_block += 4 * h * h
        elif self.conditioning == "cross-attn":
            per_block += n * (2 * h * h) + 2 * (2 * h * h) + 2 * n * 2 * h
        total = self.depth * per_block
        total += n * self.in_channels * p * p * h  # patch embed
        total += 256 * h + h * h  # timestep MLP
        total += n * h * p * p * self.out_channels + (2 * h * h if self.conditioning in ("adaln-zero", "adaln") else 0)
        return total


def variant_config(name: str, image_size: int = 256, **overrides: Any) -> DiTConfig:
    """Config of a named variant (``"XL/2"``, also ``"DiT-XL/2"``) at ``image_size`` px (latents = size/8)."""
    key = name.upper().replace("DIT-", "")
    if name == "digits" or key == "DIGITS":
        cfg = DIGITS
        return dataclasses.replace(cfg, **overrides) if overrides else cfg
    if key not in VARIANTS:
        raise DitDeployError(f"unknown variant {name!r}: choose one of {', '.join(VARIANTS)} or 'digits'")
    if image_size % VAE_DOWNSAMPLE:
        raise DitDeployError(f"image size {image_size} is not a multiple of {VAE_DOWNSAMPLE}")
    latent = image_size // VAE_DOWNSAMPLE
    v = VARIANTS[key]
    if latent % v["patch_size"]:
        raise DitDeployError(f"latent size {latent} is not divisible by patch size {v['patch_size']}")
    base = dict(input_size=latent, in_channels=LATENT_CHANNELS, variant=key, **v)
    base.update(overrides)
    cfg = DiTConfig(**base)
    if cfg.conditioning not in CONDITIONINGS:
        raise DitDeployError(f"unknown conditioning {cfg.conditioning!r}: choose one of {', '.join(CONDITIONINGS)}")
    return cfg


# The shipped default model: trained by `ditdeploy train --preset digits` on scikit-learn's 8x8 digits, in pixel
# space (1 channel, values in [-1, 1]), 10 classes (null class id 10). Small enough to train on a 2-core CPU.
DIGITS = DiTConfig(
    input_size=8,
    patch_size=2,
    in_channels=1,
    hidden_size=128,
    depth=4,
    num_heads=4,
    mlp_ratio=4.0,
    class_dropout_prob=0.1,
    num_classes=10,
    learn_sigma=True,
    conditioning="adaln-zero",
    variant="digits",
    space="pixel",
)
