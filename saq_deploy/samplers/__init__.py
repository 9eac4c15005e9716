"""Diffusion samplers over an eps-prediction model: DDIM, PLMS, DPM-Solver-2, DPM-Solver++(2M), UniPC.

Every sampler is ``sample_<name>(eps_model, x, schedule, timesteps, *, cond, callback, **knobs)``
and reproduces the corresponding diffusers scheduler; ``run_sampler`` picks the default grid.
Imports only ``saq_deploy.schedules`` and ``saq_deploy.errors`` (and, for typing,
``saq_deploy.models.eps_model``): no ONNX Runtime, no TensorRT.
"""

from saq_deploy.samplers.base import EvalInfo, StepCallback, StepInfo
from saq_deploy.samplers.ddim import sample_ddim
from saq_deploy.samplers.dpm_solver import intermediate_timesteps, sample_dpm_solver_2, sample_dpmpp_2m
from saq_deploy.samplers.plms import sample_plms
from saq_deploy.samplers.registry import SAMPLERS, default_grid, get_sampler, run_sampler
from saq_deploy.samplers.unipc import sample_unipc

__all__ = [
    "SAMPLERS",
    "EvalInfo",
    "StepCallback",
    "StepInfo",
    "default_grid",
    "get_sampler",
    "intermediate_timesteps",
    "run_sampler",
    "sample_ddim",
    "sample_dpm_solver_2",
    "sample_dpmpp_2m",
    "sample_plms",
    "sample_unipc",
]
