"""PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"), as
diffusers' ``PNDMScheduler(skip_prk_steps=True)`` runs it.

Each step transfers x with the DDIM formula (the paper's eq. 9, algebraically the same as eq. 12 of
DDIM) but uses a linear-multistep (Adams-Bashforth) combination of past noise predictions:
2nd / 3rd / 4th order as history accumulates. The first step has no history: it is an
improved-Euler step, a DDIM predictor to the next grid point, a second evaluation there, and
the averaged eps -- so N >= 2 steps cost N + 1 evaluations.
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


def _adams_bashforth(history: list[Tensor]) -> Tensor:
    """Combination of the last (up to 4) eps, newest last (PNDM eqs. 12 with lower-order warm-up)."""
    e = history
    if len(e) == 1:
        return e[-1]
    if len(e) == 2:
        return (3 * e[-1] - e[-2]) / 2
    if len(e) == 3:
        return (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
    return (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24


@torch.no_grad()
def sample_plms(
    eps_model: EpsModel,
    x: Tensor,
    schedule: VPSchedule,
    timesteps: Tensor | Sequence[float],
    *,
    cond: Tensor | None = None,
    callback: StepCallback | None = None,
    stride: int | None = None,
) -> Tensor:
    """PLMS sampling over ``timesteps`` (N = len - 1 steps; N + 1 evaluations when N >= 2).

    Diffusers' default ``set_alpha_to_one=False`` corresponds to terminal point 0, ``True`` to CLEAN.
    ``stride``: as :func:`~saq_deploy.samplers.ddim.sample_ddim`, diffusers steps from ``t_i`` to
    ``t_i - T//N``, and its warm-up correction runs from ``t_1 + T//N`` to ``t_1``; pass
    ``stride=T//N`` to reproduce that on grids where it is not the grid spacing.
    """
    ts = check_grid(timesteps, schedule)
    n = len(ts) - 1
    history: list[Tensor] = []  # eps at the outer points only (the warm-up eval is not kept)
    for i in range(n):
        t = ts[i]
        eps = evaluate(eps_model, x, t, cond)
        evals = [EvalInfo(x, t, cond, eps, "outer")]
        history = (history + [eps])[-4:]
        if i == 0 and n > 1:
            # Warm-up (improved Euler): predictor, re-evaluate at the next grid point, average.
            x_pred = first_order_step(schedule, x, eps, t, stride_target(t, stride, ts[1], ts[-1]))
            t_to = ts[1]
            eps_pred = evaluate(eps_model, x_pred, t_to, cond)
            evals.append(EvalInfo(x_pred, t_to, cond, eps_pred, "intermediate"))
            t_start = t if stride is None else t_to + stride  # diffusers re-derives the start point
            x_next = first_order_step(schedule, x, (eps + eps_pred) / 2, t_start, t_to)
        else:
            t_to = stride_target(t, stride, ts[i + 1], ts[-1])
            x_next = first_order_step(schedule, x, _adams_bashforth(history), t, t_to)
        emit(callback, StepInfo(i, t, t_to, x, x_next, evals))
        x = x_next
    return x
