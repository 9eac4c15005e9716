"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 with eta = 0).

With eta = 0 a DDIM step is exactly the first-order DPM-Solver update (Lu et al. 2022, eq. 3.7):
``x_t = alpha_t/alpha_s x_s - sigma_t (e^h - 1) eps(x_s, s)``, ``h = lam_t - lam_s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saq_deploy.samplers.base import (
    EvalInfo,
    StepCallback,
    StepInfo,
    check_grid,
    emit,
    evaluate,
    first_order_step,
    stride_target,
)
from saq_deploy.schedules.vp import VPSchedule

if TYPE_CHECKING:
    from saq_deploy.models.eps_model import EpsModel


@torch.no_grad()
def sample_ddim(
    eps_model: EpsModel,
    x: Tensor,
    schedule: VPSchedule,
    timesteps: Tensor | Sequence[float],
    *,
    cond: Tensor | None = None,
    callback: StepCallback | None = None,
    stride: int | None = None,
) -> Tensor:
    """Deterministic DDIM: one model evaluation per step, N = len(timesteps) - 1 steps.

    ``stride``: diffusers' ``DDIMScheduler`` steps from ``t_i`` to ``t_i - T//N`` (or to the
    terminal point once that is negative), not to the next grid point. The two agree for
    ``leading`` spacing, and for ``trailing`` when N divides T; pass ``stride=T//N``
    (:func:`~saq_deploy.schedules.ddim_stride`) to reproduce diffusers on any other grid.
    The schedule's x0 policy (``clip_sample`` / ``thresholding`` of the model's scheduler config)
    acts as in ``DDIMScheduler.step``: x_t = alpha_t clip(x0) + sigma_t eps, with the model's own
    eps as the direction (diffusers' ``use_clipped_model_output=False``).
    """
    ts = check_grid(timesteps, schedule)
    policy = schedule.x0
    for i, t in enumerate(ts[:-1]):
        eps = evaluate(eps_model, x, t, cond)
        t_to = stride_target(t, stride, ts[i + 1], ts[-1])
        if policy is not None and policy.applies(clip=True):
            a_s, s_s, _ = schedule.coeffs(t)
            a_t, s_t, _ = schedule.coeffs(t_to)
            x_next = a_t * policy.apply((x - s_s * eps) / a_s, clip=True) + s_t * eps
        else:
            x_next = first_order_step(schedule, x, eps, t, t_to)
        emit(callback, StepInfo(i, t, t_to, x, x_next, [EvalInfo(x, t, cond, eps, "outer")]))
        x = x_next
    return x
