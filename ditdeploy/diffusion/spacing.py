"""Timestep respacing with the official ``space_timesteps`` semantics, and the timesteps each sampler uses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ditdeploy.diffusion.schedule import NUM_TRAIN_TIMESTEPS

__all__ = ["METHODS", "sampling_timesteps", "space_timesteps", "spacing_rule"]

METHODS = ("ddpm", "ddim", "dpm-solver++")


def _ddim_stride_steps(num_timesteps: int, desired: int) -> set[int] | None:
    """``range(0, T, i)`` for the smallest integer stride ``i`` giving exactly ``desired`` steps, else None."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
            return set(range(0, num_timesteps, stride))
    return None


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Timesteps of the original ``num_timesteps``-step process to keep (official ``respace.space_timesteps``).

    - ``"ddimN"``: the DDIM paper's fixed integer stride, ``range(0, T, stride)`` with the smallest stride giving
      exactly N steps (``ddim10`` on 1000 -> 0, 100, ..., 900); ValueError if no integer stride does.
    - ``"a,b,c"`` or a sequence of ints: the process is cut into equal sections (the first ``T % k`` one step longer);
      section j keeps ``section_counts[j]`` steps at ``start + round(x)``, x accumulating ``(size-1)/(count-1)`` by
      repeated float addition (Python's round-half-to-even; the accumulation is what the reference does, and it
      matters: e.g. "21" keeps 499, not 500). ``"250"`` on 1000 -> 0, 4, 8, ..., 995, 999.
      ValueError when a section is shorter than its count or a count is not an integer.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            steps = _ddim_stride_steps(num_timesteps, desired)
            if steps is None:
                raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
            return steps
        section_counts = [int(x) for x in section_counts.split(",")]
    counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError("section_counts is empty")
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept: list[int] = []
    for j, count in enumerate(counts):
        size = size_per + (1 if j < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        x = 0.0
        for _ in range(count):
            kept.append(start + round(x))
            x += stride
        start += size
    return set(kept)


def spacing_rule(method: str, steps: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> str:
    """The respacing string a sampler uses for ``steps`` steps (see ``sampling_timesteps``)."""
    if method == "ddim" and _ddim_stride_steps(num_timesteps, steps) is not None:
        return f"ddim{steps}"
    if method in ("ddim", "ddpm"):
        return str(steps)
    if method == "dpm-solver++":
        return f"linspace{steps}"
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def sampling_timesteps(method: str, steps: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Original timesteps (int64, ascending) at which ``method`` evaluates the denoiser with ``steps`` steps.

    - ``"ddim"``: the ``"ddimN"`` rule (N=10 -> 0, 100, ..., 900). Where no integer stride gives exactly N steps
      (N=1, and many N above 500, e.g. 999) it falls back to the evenly rounded ``"N"`` rule, so the sampler always
      takes exactly N steps; ``spacing_rule()`` tells which rule was used.
    - ``"ddpm"``: the evenly rounded ``"N"`` rule (N=250 -> 0, 4, 8, ..., 995, 999).
    - ``"dpm-solver++"``: ``round(linspace(T-1, 0, N))`` (N=1 -> [T-1]): N evaluations from T-1 down to and including
      t=0, then a final first-order step to sigma=0 (which returns the x_0 prediction at t=0, like DDIM's last step).
      Ending at t=0 makes the solver converge to the same probability-flow answer as DDIM with all 1000 steps.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    rule = spacing_rule(method, steps, num_timesteps)
    if rule.startswith("linspace"):
        ts = np.unique(np.round(np.linspace(num_timesteps - 1, 0, steps)).astype(np.int64))
        assert ts.size == steps, "rounded linspace produced duplicate timesteps"
        return ts
    return np.array(sorted(space_timesteps(num_timesteps, rule)), dtype=np.int64)
