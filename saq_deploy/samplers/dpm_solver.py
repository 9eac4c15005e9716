"""DPM-Solver samplers: singlestep DPM-Solver-2 and multistep DPM-Solver++(2M).

Singlestep DPM-Solver-2, noise-prediction form (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver
for Diffusion Probabilistic Model Sampling in Around 10 Steps", Algorithm 1 / eq. 3.8 with general
r1 as in Algorithm 4).

For step i from t_{i-1} to t_i (h = lam_{t_i} - lam_{t_{i-1}}), with s_i at lam_{t_{i-1}} + r1 h:

    u_i     = alpha_{s_i}/alpha_{t_{i-1}} x - sigma_{s_i} (e^{r1 h} - 1) eps(x, t_{i-1})
    x_{t_i} = alpha_{t_i}/alpha_{t_{i-1}} x - sigma_{t_i} (e^h - 1) [eps(x, t_{i-1})
              + (eps(u_i, s_i) - eps(x, t_{i-1})) / (2 r1)]

For r1 = 1/2 the bracket is just eps(u_i, s_i). Two model evaluations per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saq_deploy.errors import ConfigError
from saq_deploy.samplers.base import (
    EvalInfo,
    StepCallback,
    StepInfo,
    check_grid,
    denoised_eps,
    emit,
    evaluate,
    first_order_step,
)
from saq_deploy.schedules.vp import CLEAN, VPSchedule

if TYPE_CHECKING:
    from saq_deploy.models.eps_model import EpsModel


def intermediate_timesteps(
    schedule: VPSchedule, timesteps: Tensor | Sequence[float], r1: float = 0.5
) -> list[float]:
    """s_i = t(lam_{t_{i-1}} + r1 h_i) for every step (lambda midpoints for r1 = 1/2). A step that
    ends at CLEAN has no finite intermediate point; it gets CLEAN (and is taken first-order)."""
    ts = check_grid(timesteps, schedule)
    lam = schedule.lam(torch.tensor(ts, dtype=torch.float64))
    lam_s = lam[:-1] + r1 * (lam[1:] - lam[:-1])
    out = schedule.t_from_lam(lam_s)  # lam_s = +inf (step into CLEAN) maps back to CLEAN
    return [float(v) for v in out.tolist()]


@torch.no_grad()
def sample_dpm_solver_2(
    eps_model: EpsModel,
    x: Tensor,
    schedule: VPSchedule,
    timesteps: Tensor | Sequence[float],
    *,
    cond: Tensor | None = None,
    callback: StepCallback | None = None,
    r1: float = 0.5,
    intermediate: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """DPM-Solver-2 over the outer grid ``timesteps`` (N = len - 1 steps, NFE = 2N).

    ``intermediate``: explicit s_i per step (N values, t_i <= s_i <= t_{i-1}); r1 is then derived
    from lambda per step. This reproduces diffusers' ``DPMSolverSinglestepScheduler(solver_order=2,
    algorithm_type="dpmsolver", solver_type="midpoint")`` on 2N timesteps: the even ones are the
    outer grid, the odd ones the intermediate points.
    A step ending at CLEAN (sigma = 0, lam = inf) has no finite midpoint and is taken first-order,
    as diffusers does for ``final_sigmas_type="zero"``.
    The callback reports both evaluations of a step: role "outer" at (x, t_{i-1}) and role
    "intermediate" at (u_i, s_i).
    """
    ts = check_grid(timesteps, schedule, strict=True)
    n = len(ts) - 1
    if intermediate is None:
        if not 0.0 < r1 <= 1.0:
            raise ConfigError(f"r1 must be in (0, 1], got {r1}")
        mids = intermediate_timesteps(schedule, ts, r1)
    else:
        mids = [float(v) for v in torch.as_tensor(intermediate, dtype=torch.float64).reshape(-1).tolist()]
        if len(mids) != n:
            raise ConfigError(f"need {n} intermediate timesteps (one per step), got {len(mids)}")
        if any(not (t_to <= m <= t_from) for t_from, m, t_to in zip(ts, mids, ts[1:])):
            raise ConfigError("each intermediate timestep must lie inside its step [t_i, t_{i-1}]")
    for i in range(n):
        t_s, t_t, t_m = ts[i], ts[i + 1], mids[i]
        raw = evaluate(eps_model, x, t_s, cond)
        evals = [EvalInfo(x, t_s, cond, raw, "outer")]
        eps = denoised_eps(schedule, x, raw, t_s)
        if t_t == CLEAN or t_m == CLEAN or t_m == t_s:
            x_next = first_order_step(schedule, x, eps, t_s, t_t)
        else:
            lam_s = schedule.coeffs(t_s)[2]
            lam_m, lam_t = schedule.coeffs(t_m)[2], schedule.coeffs(t_t)[2]
            u = first_order_step(schedule, x, eps, t_s, t_m)
            raw_u = evaluate(eps_model, u, t_m, cond)
            evals.append(EvalInfo(u, t_m, cond, raw_u, "intermediate"))
            eps_u = denoised_eps(schedule, u, raw_u, t_m)
            # r1 exactly when we placed s_i ourselves (so r1 = 1/2 is the paper's eps(u_i, s_i) form).
            r = r1 if intermediate is None else (lam_m - lam_s) / (lam_t - lam_s)
            x_next = first_order_step(schedule, x, eps + (eps_u - eps) / (2.0 * r), t_s, t_t)
        emit(callback, StepInfo(i, t_s, t_t, x, x_next, evals))
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    eps_model: EpsModel,
    x: Tensor,
    schedule: VPSchedule,
    timesteps: Tensor | Sequence[float],
    *,
    cond: Tensor | None = None,
    callback: StepCallback | None = None,
    lower_order_final: bool = True,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Algorithm 2), data-prediction multistep, "midpoint" form, as diffusers'
    ``DPMSolverMultistepScheduler`` defaults. One evaluation per step; with x0_i the data
    prediction at t_i and r_i = h_{i-1} / h_i:

        x_{t_{i+1}} = sigma_{i+1}/sigma_i x + alpha_{i+1} (1 - e^{-h_i}) [x0_i + (x0_i - x0_{i-1}) / (2 r_i)]

    The first step is first-order; so is the last one when it ends at CLEAN (diffusers'
    ``final_sigmas_type="zero"``) or when ``lower_order_final`` and N < 15 (diffusers' rule).
    """
    ts = check_grid(timesteps, schedule, strict=True)
    n = len(ts) - 1
    prev_x0: Tensor | None = None
    h_prev = 0.0
    for i in range(n):
        t_s, t_t = ts[i], ts[i + 1]
        eps = evaluate(eps_model, x, t_s, cond)
        a_s, s_s, lam_s = schedule.coeffs(t_s)
        a_t, s_t, lam_t = schedule.coeffs(t_t)
        h = lam_t - lam_s
        x0 = (x - s_s * eps) / a_s
        if schedule.x0 is not None:  # diffusers' thresholding of the data prediction (never clip_sample)
            x0 = schedule.x0.apply(x0, clip=False)
        last = i == n - 1
        if prev_x0 is None or (last and (t_t == CLEAN or (lower_order_final and n < 15))):
            d = x0
        else:
            d = x0 + 0.5 * (x0 - prev_x0) / (h_prev / h)
        # 1 - e^{-h} via expm1: exact for small h, and exactly 1 at CLEAN (h = inf, sigma_t = 0).
        x_next = (s_t / s_s) * x + (a_t * -math.expm1(-h)) * d
        emit(callback, StepInfo(i, t_s, t_t, x, x_next, [EvalInfo(x, t_s, cond, eps, "outer")]))
        x, prev_x0, h_prev = x_next, x0, h
    return x
