"""The sampler registry: name -> run function, timestep rule, options; every sampler list derives from it.

``sample(method=...)``, ``spacing_rule``, the one settings validator (``sampling.check_settings``), the CLI's
``--sampler`` choices and help, and ``calibrate``'s settings all read :data:`SAMPLERS`. Adding a sampler is one
module holding its step loop plus one :func:`register_sampler` line at the bottom of this file (a test or plugin
may call :func:`register_sampler` itself)::

    def euler(model, x, base, timesteps, *, eta, noise, clip_denoised, callback, progress): ...
    register_sampler(SamplerSpec("euler", euler, rule=spacing.even_rule))

``run(model, x, base, timesteps, *, eta, noise, clip_denoised, callback, progress) -> x_0``: ``model(x, step_index,
t)`` is the guided denoiser (``sampling.GuidedModel``), ``base`` the 1000-step ``GaussianSchedule``, ``timesteps``
the ascending original timesteps of ``rule`` (``spacing.sampling_timesteps``), ``noise(step_index, shape)`` the
noise source. ``rule(steps, num_timesteps) -> str``: the respacing string (``"ddim10"``, ``"250"``, ``"logsnr10"``).
``options``: the sampler-specific settings it uses (``"eta"``); any other sampler refuses a non-default value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ditdeploy.diffusion import samplers, spacing
from ditdeploy.errors import DitDeployError

__all__ = ["SAMPLERS", "SamplerSpec", "get_sampler", "register_sampler", "sampler_names"]

Rule = Callable[[int, int], str]


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its CLI/API name, step loop, timestep rule, the options it uses and a one-line help."""

    name: str
    run: Callable[..., Any]
    rule: Rule
    options: tuple[str, ...] = ()
    help: str = ""


SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(spec: SamplerSpec) -> SamplerSpec:
    """Add ``spec`` (its name must be new); returns it."""
    if spec.name in SAMPLERS:
        raise ValueError(f"sampler {spec.name!r} is already registered")
    SAMPLERS[spec.name] = spec
    return spec


def sampler_names() -> tuple[str, ...]:
    """Registered sampler names, in registration order (the default ``ddim`` first)."""
    return tuple(SAMPLERS)


def get_sampler(name: str) -> SamplerSpec:
    """The spec of ``name``, else the one-line error every entry point gives for an unknown sampler."""
    spec = SAMPLERS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise DitDeployError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    return spec


# ------------------------------------------------------------------------------------------------ built-in samplers
def _ddim(model, x, base, ts, *, eta, noise, **common):
    return samplers.ddim(model, x, base.respace(ts), eta=float(eta), noise=noise, **common)


def _ddpm(model, x, base, ts, *, eta, noise, **common):
    return samplers.ddpm(model, x, base.respace(ts), noise=noise, **common)


def _dpmpp_2m(model, x, base, ts, *, eta, noise, **common):
    return samplers.dpmpp_2m(model, x, base, ts, **common)


register_sampler(SamplerSpec("ddim", _ddim, spacing.ddim_rule, options=("eta",),
                             help="DDIM (eta 0: deterministic); 'ddimN' spacing"))
register_sampler(SamplerSpec("ddpm", _ddpm, spacing.even_rule, help="ancestral DDPM, learned-range variance"))
register_sampler(SamplerSpec("dpm-solver++", _dpmpp_2m, spacing.logsnr_rule, help="DPM-Solver++(2M)"))
