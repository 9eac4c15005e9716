"""Sampler names used on the command line, and the default grid each one runs on.

Defaults reproduce the corresponding diffusers scheduler in its default configuration:

=============  ==========================================================  =========  ========
name           diffusers scheduler (defaults)                              spacing    terminal
=============  ==========================================================  =========  ========
ddim           DDIMScheduler (set_alpha_to_one=True; clip_sample=False)    leading    CLEAN
plms           PNDMScheduler(skip_prk_steps=True) (set_alpha_to_one=False) leading    0
dpm-solver-2   DPMSolverSinglestepScheduler(algorithm_type="dpmsolver")    linspace   0
dpmpp-2m       DPMSolverMultistepScheduler                                 linspace   CLEAN
unipc          UniPCMultistepScheduler                                     linspace   CLEAN
=============  ==========================================================  =========  ========

(``dpm-solver-2`` needs ``final_sigmas_type="sigma_min"`` in diffusers, hence terminal 0.)
For ``ddim`` and ``plms`` on a uniform spacing, ``run_sampler`` also passes ``stride=T//N``,
because those diffusers schedulers step by that fixed stride (see ``sample_ddim``).
``num_steps`` counts steps between grid points. For ``dpm-solver-2`` that is the number of outer
(first-order) steps, each with one intermediate point at the lambda midpoint: NFE = 2N.
For ``plms``, NFE = N + 1 (N >= 2, one extra warm-up evaluation); the others take NFE = N.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from saq_deploy.errors import ConfigError
from saq_deploy.samplers.base import StepCallback
from saq_deploy.samplers.ddim import sample_ddim
from saq_deploy.samplers.dpm_solver import sample_dpm_solver_2, sample_dpmpp_2m
from saq_deploy.samplers.plms import sample_plms
from saq_deploy.samplers.unipc import sample_unipc
from saq_deploy.schedules.spacing import UNIFORM_SPACINGS, ddim_stride, get_timesteps
from saq_deploy.schedules.vp import CLEAN, VPSchedule

if TYPE_CHECKING:
    from saq_deploy.models.eps_model import EpsModel

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddim": sample_ddim,
    "plms": sample_plms,
    "dpm-solver-2": sample_dpm_solver_2,
    "dpmpp-2m": sample_dpmpp_2m,
    "unipc": sample_unipc,
}

# name -> (default spacing, grid convention, terminal point, uses diffusers' fixed T//N stride)
_DEFAULTS: dict[str, tuple[str, str, float, bool]] = {
    "ddim": ("leading", "ddim", CLEAN, True),
    "plms": ("leading", "ddim", 0.0, True),
    "dpm-solver-2": ("linspace", "dpm", 0.0, False),
    "dpmpp-2m": ("linspace", "dpm", CLEAN, False),
    "unipc": ("linspace", "dpm", CLEAN, False),
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler function registered under ``name``; ConfigError listing the valid names otherwise."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}") from None


def default_grid(
    name: str, num_steps: int, schedule: VPSchedule, *, spacing: str | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """The grid (and extra sampler knobs) that :func:`run_sampler` uses for ``name``."""
    get_sampler(name)
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ConfigError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    default_spacing, convention, terminal, strided = _DEFAULTS[name]
    spacing = default_spacing if spacing is None else spacing
    grid = get_timesteps(spacing, num_steps, schedule, convention=convention, terminal=terminal)
    knobs: dict[str, Any] = {}
    if strided and spacing in UNIFORM_SPACINGS:
        knobs["stride"] = ddim_stride(schedule.num_train_timesteps, num_steps)
    return grid, knobs


def run_sampler(
    name: str,
    eps_model: EpsModel,
    x: Tensor,
    schedule: VPSchedule,
    num_steps: int,
    *,
    spacing: str | None = None,
    cond: Tensor | None = None,
    callback: StepCallback | None = None,
    timesteps: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """Sample with ``name`` for ``num_steps`` steps on its default grid (see the module docstring);
    ``spacing`` overrides the spacing (one of ``saq_deploy.schedules.SPACINGS``).

    ``timesteps``: an explicit grid instead (``num_steps + 1`` points, terminal last), run as given:
    each step lands on the next point (no diffusers stride), so two samplers handed the same grid
    share their outer points (a quantized DDIM-N and the FP DPM-Solver-2-N it is aligned to)."""
    sampler = get_sampler(name)
    if timesteps is None:
        grid, knobs = default_grid(name, num_steps, schedule, spacing=spacing)
        return sampler(eps_model, x, schedule, grid, cond=cond, callback=callback, **knobs)
    n_points = len(timesteps)
    if n_points != num_steps + 1:
        raise ConfigError(f"an explicit grid for {num_steps} steps needs {num_steps + 1} points, got {n_points}")
    return sampler(eps_model, x, schedule, timesteps, cond=cond, callback=callback)
