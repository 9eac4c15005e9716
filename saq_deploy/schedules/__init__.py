"""Noise schedules and timestep grids (no model, no sampler: pure functions of alphas_cumprod)."""

from saq_deploy.schedules.spacing import CONVENTIONS, SPACINGS, UNIFORM_SPACINGS, ddim_stride, get_timesteps
from saq_deploy.schedules.vp import CLEAN, VPSchedule

__all__ = [
    "CLEAN",
    "CONVENTIONS",
    "SPACINGS",
    "UNIFORM_SPACINGS",
    "VPSchedule",
    "ddim_stride",
    "get_timesteps",
]
