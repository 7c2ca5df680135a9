"""Diffusion maths and samplers, numpy only (no torch import anywhere in this package).

- ``schedule``: ``GaussianSchedule`` float64 tables of the linear 1000-step schedule (``base_schedule()``) and its
  ``respace()`` (official SpacedDiffusion).
- ``spacing``: ``space_timesteps`` (official respace.py semantics) and ``sampling_timesteps(method, steps)``.
- ``samplers``: ``ddpm``, ``ddim``, ``dpmpp_2m`` as pure functions over ``model(x, step_index, t)``.
- ``registry``: ``SAMPLERS`` name -> step loop, timestep rule, options (``register_sampler`` adds one).
- ``sampling``: ``sample(denoiser, noise, labels, *, method, steps, cfg_scale, ...)``, the public entry point.
"""

from ditdeploy.diffusion.registry import (
    SAMPLERS,
    SamplerSpec,
    get_sampler,
    register_sampler,
    sampler_names,
    sampling_timesteps,
    spacing_rule,
)
from ditdeploy.diffusion.samplers import ddim, ddpm, dpmpp_2m
from ditdeploy.diffusion.sampling import (
    GuidedModel,
    check_cache_interval,
    check_settings,
    denoiser_name,
    guided_steps,
    parse_cfg_interval,
    sample,
)
from ditdeploy.diffusion.schedule import NUM_TRAIN_TIMESTEPS, GaussianSchedule, base_schedule, linear_betas
from ditdeploy.diffusion.spacing import space_timesteps

METHODS = sampler_names()  # the built-in samplers (a snapshot; SAMPLERS is the live registry)

__all__ = [
    "METHODS",
    "NUM_TRAIN_TIMESTEPS",
    "GaussianSchedule",
    "GuidedModel",
    "SAMPLERS",
    "SamplerSpec",
    "check_cache_interval",
    "check_settings",
    "get_sampler",
    "register_sampler",
    "sampler_names",
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
