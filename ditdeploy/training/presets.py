"""Named training presets: defaults a preset sets unless the user passes the option explicitly."""

from __future__ import annotations

from typing import Any

from ditdeploy.errors import DitDeployError

# Defaults of a plain (ImageFolder) run: the official train.py recipe (global batch 256, AdamW 1e-4, no weight
# decay, EMA 0.9999), in steps instead of epochs.
GENERAL_DEFAULTS: dict[str, Any] = {
    "model": "S/2",
    "image_size": 256,
    "global_batch": 256,
    "steps": 400_000,
    "lr": 1e-4,
    "weight_decay": 0.0,
    "ema_decay": 0.9999,
    "seed": 0,
    "precision": "fp32",
    "log_every": 100,
    "ckpt_every": 5000,
    "keep": 3,
    "num_workers": 4,
    "flip": True,
    "threads": None,
}

# The shipped "digits" model (ditdeploy/assets/digits.safetensors): scikit-learn's 8x8 digits in pixel space,
# trained on a 2-core CPU in under 10 minutes. A short run needs a larger learning rate and an EMA horizon
# (1 / (1 - decay) = 200 steps) that is a small fraction of the run; 0.9999 would average mostly the random init.
PRESETS: dict[str, dict[str, Any]] = {
    "digits": {
        "model": "digits",
        "global_batch": 128,
        "steps": 2000,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "ema_decay": 0.995,
        "seed": 0,
        "precision": "fp32",
        "log_every": 25,
        "ckpt_every": 500,
        "keep": 2,
        "num_workers": 0,
        "flip": False,
        # one thread: the model's matrices are small, and on a busy 2-core machine two OpenMP threads spin-wait
        # for each other (measured 0.4 vs 4.7 steps/s under load); also makes the run bitwise reproducible
        "threads": 1,
    },
}


def preset_defaults(name: str | None) -> dict[str, Any]:
    """General defaults overlaid with the named preset's (``None``: general only)."""
    out = dict(GENERAL_DEFAULTS)
    if name is None:
        return out
    if name not in PRESETS:
        raise DitDeployError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    out.update(PRESETS[name])
    return out
