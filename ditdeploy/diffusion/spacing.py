"""Timestep respacing with the official ``space_timesteps`` semantics, and the spacing rules the samplers use."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ditdeploy.diffusion.schedule import NUM_TRAIN_TIMESTEPS

__all__ = ["ddim_rule", "even_rule", "logsnr_rule", "logsnr_timesteps", "space_timesteps"]


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


def logsnr_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """``steps`` distinct integer timesteps, ascending, uniform in log-SNR between T-1 and 0 (see below)."""
    from ditdeploy.diffusion.schedule import base_schedule

    abar = base_schedule(num_timesteps).alphas_cumprod
    lam = 0.5 * (np.log(abar) - np.log1p(-abar))  # decreasing in t
    target = np.linspace(lam[-1], lam[0], steps)  # high noise -> low noise
    t_cont = np.interp(target, lam[::-1], np.arange(num_timesteps, dtype=np.float64)[::-1])
    ts = np.round(t_cont).astype(np.int64)
    ts[0] = num_timesteps - 1
    if steps > 1:
        ts[-1] = 0
    for k in range(steps - 2, -1, -1):  # strictly decreasing from the low-noise end
        ts[k] = max(ts[k], ts[k + 1] + 1)
    ts = np.minimum(ts, num_timesteps - 1 - np.arange(steps))  # and within range from the high-noise end
    return ts[::-1].copy()


def ddim_rule(steps: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> str:
    """DDIM's rule: ``"ddimN"`` (a fixed integer stride) when one gives exactly N steps, else ``"N"``."""
    return f"ddim{steps}" if _ddim_stride_steps(num_timesteps, steps) is not None else str(steps)


def even_rule(steps: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> str:
    """The evenly rounded ``"N"`` rule (DDPM)."""
    return str(steps)


def logsnr_rule(steps: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> str:
    """N timesteps uniform in log-SNR (DPM-Solver++)."""
    return f"logsnr{steps}"
