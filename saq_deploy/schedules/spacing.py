"""Timestep grids for N sampling steps.

A grid is a 1-D float64 tensor of N+1 non-increasing timesteps in the discrete scale: the N points
where the model is evaluated (``grid[:-1]``, all >= 0) followed by the terminal point
``grid[-1]`` the last step lands on: :data:`~saq_deploy.schedules.vp.CLEAN` (-1: alpha=1,
sigma=0) or ``0`` (alpha = sqrt(alphas_cumprod[0]), diffusers' "sigma_min" /
``set_alpha_to_one=False``).

Uniform spacings reproduce diffusers' ``set_timesteps`` exactly, and diffusers computes them in
two slightly different ways, selected by ``convention``:

- ``"ddim"``: ``DDIMScheduler`` / ``PNDMScheduler`` -- N points, e.g. linspace(0, T-1, N);
- ``"dpm"``: ``DPMSolverMultistepScheduler`` / ``DPMSolverSinglestepScheduler`` /
  ``UniPCMultistepScheduler`` -- N+1 points, e.g. linspace(0, T-1, N+1), minus the last (0).

``quadratic`` (DPM-Solver's ``skip_type='time_quadratic'``) and ``logsnr`` (uniform in lambda,
``skip_type='logSNR'``) span [T-1, 0] with N+1 (fractional) points; like the ``dpm`` convention,
the final point 0 is then replaced by ``terminal``.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import Tensor

from saq_deploy.errors import ConfigError
from saq_deploy.schedules.vp import CLEAN, VPSchedule

UNIFORM_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
SPACINGS: tuple[str, ...] = UNIFORM_SPACINGS + ("quadratic", "logsnr")
CONVENTIONS: tuple[str, ...] = ("ddim", "dpm")


def _uniform_ddim(spacing: str, n: int, T: int, steps_offset: int) -> np.ndarray:
    # Mirrors DDIMScheduler.set_timesteps (PNDMScheduler builds the same set in ascending order).
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + steps_offset
    ratio = T / n  # trailing
    return np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1


def _uniform_dpm(spacing: str, n: int, T: int, steps_offset: int) -> np.ndarray:
    # Mirrors DPMSolverMultistepScheduler / UniPCMultistepScheduler.set_timesteps (lambda_min_clipped=-inf).
    if spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = T // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    ratio = T / n  # trailing
    return np.arange(T, 0, -ratio).round().astype(np.int64) - 1


def get_timesteps(
    spacing: str,
    num_steps: int,
    schedule: VPSchedule,
    *,
    convention: str = "dpm",
    terminal: float = CLEAN,
    steps_offset: int = 0,
) -> Tensor:
    """Descending float64 grid of ``num_steps + 1`` timesteps (``num_steps`` evaluation points, then
    ``terminal``). ``spacing`` is one of :data:`SPACINGS`; ``convention`` (``"ddim"`` or ``"dpm"``)
    picks which diffusers scheduler family a uniform spacing reproduces; ``steps_offset`` is
    diffusers' offset for ``leading``.
    """
    if spacing not in SPACINGS:
        raise ConfigError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    if convention not in CONVENTIONS:
        raise ConfigError(f"unknown grid convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ConfigError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if terminal != CLEAN and terminal != 0:
        raise ConfigError(f"terminal must be CLEAN (-1) or 0, got {terminal!r}")
    T = schedule.num_train_timesteps
    if spacing in UNIFORM_SPACINGS:
        if num_steps > T:
            raise ConfigError(f"num_steps ({num_steps}) cannot exceed num_train_timesteps ({T})")
        build = _uniform_ddim if convention == "ddim" else _uniform_dpm
        points = torch.from_numpy(build(spacing, num_steps, T, steps_offset).astype(np.float64))
    elif spacing == "quadratic":
        # DPM-Solver time_quadratic in continuous time t_c = (t + 1) / T, from t_c = 1 to 1/T.
        tc = torch.linspace(1.0, (1.0 / T) ** 0.5, num_steps + 1, dtype=torch.float64) ** 2
        points = (tc * T - 1.0)[:-1]
    else:  # logsnr
        lam = torch.linspace(
            float(schedule.lam(T - 1)), float(schedule.lam(0)), num_steps + 1, dtype=torch.float64
        )
        points = schedule.t_from_lam(lam)[:-1]
    points = points.clamp(0.0, T - 1.0)  # guards round-off at the ends; uniform ones are already in range
    if points.numel() != num_steps or bool(torch.any(points[1:] > points[:-1])):
        raise ConfigError(f"{spacing!r} spacing cannot make {num_steps} distinct steps from {T} timesteps")
    return torch.cat([points, torch.tensor([float(terminal)], dtype=torch.float64)])


def ddim_stride(num_train_timesteps: int, num_steps: int) -> int:
    """The fixed stride ``T // N`` that DDIMScheduler / PNDMScheduler step by (see ``sample_ddim``)."""
    return num_train_timesteps // num_steps
