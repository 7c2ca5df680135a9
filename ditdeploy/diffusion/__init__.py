"""Diffusion maths and samplers, numpy only (no torch import anywhere in this package).

- ``schedule``: ``GaussianSchedule`` float64 tables of the linear 1000-step schedule (``base_schedule()``) and its
  ``respace()`` (official SpacedDiffusion).
- ``spacing``: ``space_timesteps`` (official respace.py semantics) and ``sampling_timesteps(method, steps)``.
- ``samplers``: ``ddpm``, ``ddim``, ``dpmpp_2m`` as pure functions over ``model(x, step_index, t)``.
- ``sampling``: ``sample(denoiser, noise, labels, *, method, steps, cfg_scale, ...)``, the public entry point.
"""

from ditdeploy.diffusion.samplers import ddim, ddpm, dpmpp_2m
from ditdeploy.diffusion.sampling import (
    GuidedModel,
    check_cache_interval,
    denoiser_name,
    guided_steps,
    parse_cfg_interval,
    sample,
)
from ditdeploy.diffusion.schedule import NUM_TRAIN_TIMESTEPS, GaussianSchedule, base_schedule, linear_betas
from ditdeploy.diffusion.spacing import METHODS, sampling_timesteps, space_timesteps, spacing_rule

__all__ = [
    "METHODS",
    "NUM_TRAIN_TIMESTEPS",
    "GaussianSchedule",
    "GuidedModel",
    "check_cache_interval",
    "base_schedule",
    "ddim",
    "ddpm",
    "denoiser_name",
    "dpmpp_2m",
    "guided_steps",
    "linear_betas",
    "parse_cfg_interval",
    "sample",
    "sampling_timesteps",
    "space_timesteps",
    "spacing_rule",
]
