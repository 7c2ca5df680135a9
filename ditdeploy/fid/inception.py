"""The standard FID InceptionV3 (pool3, 2048-d) in torch, loading pytorch-fid's published weights file.

Written for this project from the published architecture (torchvision's Inception3 as patched by pytorch-fid for
the TensorFlow FID graph); parameter names match pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` so it
loads with ``load_state_dict(strict=True)`` from ``torch.load(weights_only=True)``. The FID variant differs from
torchvision's ImageNet model in three places (TensorFlow's graph): average pools in the A/C/first-E blocks exclude
the zero padding, the last E block max-pools its pool branch, and the classifier has 1008 outputs.

Per batch (uint8 NHWC, any size; 1 channel is repeated to 3): scale to [0, 1], bilinear resize to 299x299
(``align_corners=False``), map to [-1, 1], run the network, and return
- ``pool``: the 2048-d global average pool (FID, precision / recall),
- ``probs``: softmax of ``pool @ fc.weight.T`` over the 1008 classes (no bias: the logits ADM's evaluator and the
  original Inception Score code use),
- ``spatial``: the first 7 channels of ``Mixed_6d``'s 1x1 branch (17x17, after ReLU), flattened in NHWC order to
  2023 values: TensorFlow's ``mixed_6/conv`` that ADM's evaluator uses for sFID.

Weights never download: ``--inception FILE`` or ``<cache>/pt_inception-2015-12-05-6726825d.pth`` with the cache
``$DITDEPLOY_CACHE`` or ``~/.cache/ditdeploy``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditdeploy.errors import ArtifactError, DitDeployError
from ditdeploy.fid.features import Features

__all__ = ["WEIGHTS_NAME", "WEIGHTS_URL", "build_inception", "default_weights_path", "load_inception"]

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
# torch.hub names files <name>-<first 8 hex digits of the sha256>.<ext>; a file whose sha256 does not start with this
# is reported as not the published one (FID values from other weights are not comparable to published ones).
PUBLISHED_SHA256_PREFIX = "6726825d"
SPATIAL_CHANNELS = 7


def default_weights_path() -> Path:
    """Where the weights are looked for without ``--inception``."""
    from ditdeploy.sources.official_weights import resolve_cache_dir

    return resolve_cache_dir() / WEIGHTS_NAME


class Conv(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, k: Any, stride: int = 1, padding: Any = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # 35x35: Mixed_5b/5c/5d
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x):
        d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), d,
                          self.branch_pool(avg3(x))], 1)


class BlockB(nn.Module):  # 35 -> 17: Mixed_6a
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, stride=2)

    def forward(self, x):
        d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), d, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):  # 17x17, factorised 7x7: Mixed_6b..6e
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(k=(1, 7), padding=(0, 3)), dict(k=(7, 1), padding=(3, 0))
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = Conv(cin, c7, 1), Conv(c7, c7, **row)
        self.branch7x7_3 = Conv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, **row), Conv(c7, c7, **col)
        self.branch7x7dbl_5 = Conv(c7, 192, **row)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), a, d, self.branch_pool(avg3(x))], 1)


class BlockD(nn.Module):  # 17 -> 8: Mixed_7a
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        s = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), s, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):  # 8x8, expanded: Mixed_7b (avg pool branch), Mixed_7c (max pool branch)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        t = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(t), self.branch3x3_2b(t),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(p)], 1)


def build_inception():
    """The FID InceptionV3 (random weights; load a state dict into it). ``forward(x in [-1, 1], 299x299)`` returns
    ``(pool (N, 2048), spatial (N, 7, 17, 17))``; ``fc`` (2048 -> 1008) gives the class logits."""
    class FidInceptionV3(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
            self.Conv2d_2a_3x3 = Conv(32, 32, 3)
            self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
            self.Conv2d_3b_1x1 = Conv(64, 80, 1)
            self.Conv2d_4a_3x3 = Conv(80, 192, 3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
            self.Mixed_6a = BlockB(288)
            self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = BlockC(768, 128), BlockC(768, 160), \
                BlockC(768, 160), BlockC(768, 192)
            self.Mixed_7a = BlockD(768)
            self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
            self.fc = nn.Linear(2048, 1008)

        def forward(self, x):
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
            x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(F.max_pool2d(x, 3, stride=2))))
            x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x))))
            spatial = x[:, :SPATIAL_CHANNELS]  # Mixed_6d's output starts with its 1x1 branch
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
            return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), spatial

    return FidInceptionV3()


def _load_state(path: Path):
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come as several types; all mean "not a weights file"
        raise ArtifactError(f"cannot read Inception weights {path}: not a PyTorch weights file ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ArtifactError(f"Inception weights {path} hold a {type(sd).__name__}, not a state dict")
    return sd


def _load_weights(model, path: Path) -> None:
    sd = _load_state(path)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        ref = model.state_dict()
        missing = sorted(set(ref) - set(sd) - {k for k in ref if k.endswith("num_batches_tracked")})
        extra = sorted(set(sd) - set(ref))
        shapes = [k for k in set(ref) & set(sd) if tuple(ref[k].shape) != tuple(getattr(sd[k], "shape", ()))]
        what = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else "") + \
               (f" {len(extra)} unexpected (e.g. {extra[0]})" if extra else "") + \
               (f" {len(shapes)} of another shape (e.g. {sorted(shapes)[0]})" if shapes else "")
        raise ArtifactError(f"{path} is not the FID InceptionV3's weights ({what.strip() or e}): pass "
                            f"pytorch-fid's {WEIGHTS_NAME}") from e


class InceptionExtractor:
    """The FID InceptionV3 with loaded weights as a feature extractor for uint8 NHWC batches of any size."""

    name = "fid-inception-v3"
    image_shape = None
    has_spatial = True

    def __init__(self, path: Path, device: str = "cpu"):
        from ditdeploy.artifact.files import sha256_file

        self.path = Path(path)
        self.device = device
        self.model = build_inception()
        _load_weights(self.model, self.path)
        self.model.eval().to(device)
        self.sha256 = sha256_file(self.path)

    def __call__(self, u8: np.ndarray) -> Features:
        with torch.inference_mode():
            x = torch.from_numpy(np.array(u8, copy=True))  # stream batches are read-only views
            x = x.to(self.device).permute(0, 3, 1, 2).float() / 255.0
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2.0 - 1.0
            pool, spatial = self.model(x)
            logits = pool @ self.model.fc.weight.T
            probs = torch.softmax(logits.double(), dim=1)
            sp = spatial.permute(0, 2, 3, 1).reshape(len(u8), -1)
        return Features(pool=pool.double().cpu().numpy(), probs=probs.cpu().numpy(), spatial=sp.double().cpu().numpy())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "weights": str(self.path), "sha256": self.sha256,
                "published_weights": self.sha256.startswith(PUBLISHED_SHA256_PREFIX), "feature_dim": 2048,
                "spatial_dim": SPATIAL_CHANNELS * 17 * 17, "classes": 1008, "device": self.device}


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DitDeployError(f"--device {device}: no CUDA device is available to torch here")
    if device != "cpu" and not device.startswith("cuda"):
        raise DitDeployError(f"--device takes auto, cpu or cuda[:N], got {device!r}")
    return device


def load_inception(path: str | os.PathLike | None = None, device: str = "auto") -> InceptionExtractor:
    """The extractor with weights from ``path`` or the cache; a missing file is a one-line error saying where."""
    p = Path(path) if path is not None else default_weights_path()
    if not p.is_file():
        where = (f"--inception {p} " + ("is not a regular file" if p.exists() else "does not exist")
                 if path is not None else f"Inception weights not found at {p}")
        raise ArtifactError(f"{where}: put pytorch-fid's {WEIGHTS_NAME} (from {WEIGHTS_URL}) at "
                            f"{default_weights_path()} (cache: $DITDEPLOY_CACHE or ~/.cache/ditdeploy), or pass "
                            f"--inception FILE; nothing is downloaded at run time")
    return InceptionExtractor(p, _resolve_device(device))
