"""Training DiT (torch): the official objective, a deterministic resumable DDP loop, data pipelines, presets.

- ``training_losses(model, x0, t, y, noise)``: per-sample ``loss``/``mse``/``vb`` equal to the official
  ``GaussianDiffusion.training_losses`` with learned sigma (``losses``).
- ``TrainArgs``, ``resolve_args``, ``train``: the loop behind ``ditdeploy train`` (``loop``).
- ``update_ema`` (``ema``), data (``data``, ``sources``, ``latents``), checkpoints (``state``), ``PRESETS``.
"""

from ditdeploy.training.ema import update_ema
from ditdeploy.training.loop import TrainArgs, resolve_args, train
from ditdeploy.training.losses import training_losses
from ditdeploy.training.presets import PRESETS

__all__ = ["PRESETS", "TrainArgs", "resolve_args", "train", "training_losses", "update_ema"]
