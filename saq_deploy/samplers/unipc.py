"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), B(h) = e^{-h} - 1 ("bh2"), data prediction (predict_x0), as diffusers'
``UniPCMultistepScheduler`` defaults.

Each step i evaluates the model once, at the predictor's output x_i. That evaluation first drives
the corrector UniC, which re-does step i-1 with the new data prediction (raising its order by
one); then the predictor UniP takes step i from the corrected x_i using the multistep history.
The final step is never corrected (there is no evaluation after it), exactly as in diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saq_deploy.errors import ConfigError
from saq_deploy.samplers.base import EvalInfo, StepCallback, StepInfo, check_grid, emit, evaluate
from saq_deploy.schedules.vp import CLEAN, VPSchedule

if TYPE_CHECKING:
    from saq_deploy.models.eps_model import EpsModel


def _solve(rows: list[list[float]], rhs: list[float]) -> list[float]:
    sol = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64))
    return [float(v) for v in sol.tolist()]


def _uni_bh2(
    x: Tensor,
    s_from: float,
    lam_from: float,
    to: tuple[float, float, float],
    m0: Tensor,
    older: list[tuple[Tensor, float]],
    order: int,
    model_t: Tensor | None = None,
) -> Tensor:
    """One UniP step (``model_t`` None) or UniC correction (``model_t`` = data prediction at the
    target) of the given order, from x at (s_from, lam_from) to ``to`` = (alpha, sigma, lam).
    ``m0`` is the data prediction at the start, ``older`` the earlier (prediction, lambda) pairs,
    newest first. Follows diffusers' multistep_uni_p/c_bh_update term by term."""
    a_t, s_t, lam_t = to
    h = lam_t - lam_from
    rks: list[float] = []
    d1s: list[Tensor] = []
    for m_k, lam_k in older[: order - 1]:
        rk = (lam_k - lam_from) / h
        rks.append(rk)
        d1s.append((m_k - m0) / rk)
    rks.append(1.0)
    hh = -h  # data-prediction form integrates in -lambda
    h_phi_1 = math.expm1(hh)  # e^{-h} - 1; exactly -1 at CLEAN (h = inf)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = math.expm1(hh)  # bh2
    factorial = 1
    big_r: list[list[float]] = []
    b: list[float] = []
    for k in range(1, order + 1):
        big_r.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    x_t = (s_t / s_from) * x - (a_t * h_phi_1) * m0
    if model_t is None:  # predictor UniP-p: uses the p-1 older predictions
        if not d1s:
            return x_t
        rhos = [0.5] if order == 2 else _solve([row[:-1] for row in big_r[:-1]], b[:-1])
        res = sum((rho * d for rho, d in zip(rhos, d1s)), torch.zeros_like(x))
        return x_t - (a_t * b_h) * res
    # corrector UniC-p: also uses the new prediction at the target
    rhos = [0.5] if order == 1 else _solve(big_r, b)
    res = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), torch.zeros_like(x))
    return x_t - (a_t * b_h) * (res + rhos[-1] * (model_t - m0))


@torch.no_grad()
def sample_unipc(
    eps_model: EpsModel,
    x: Tensor,
    schedule: VPSchedule,
    timesteps: Tensor | Sequence[float],
    *,
    cond: Tensor | None = None,
    callback: StepCallback | None = None,
    order: int = 2,
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
) -> Tensor:
    """UniPC-bh2 (predictor order ``order`` in 1..3, corrector one higher), one evaluation per step.

    Orders warm up from 1 (``min(order, i + 1)``); with ``lower_order_final`` they also wind down
    (``min(order, N - i)``), and a step into CLEAN is always first-order (the higher-order terms
    are undefined at lam = inf). ``disable_corrector``: indices of steps whose result is not
    corrected (diffusers' semantics).
    In the callback, ``x_from`` of step i is the corrected x_i and ``x_to`` the predictor's
    output; the evaluation reported is at that uncorrected point, which is what the model saw.
    """
    if order not in (1, 2, 3):
        raise ConfigError(f"UniPC order must be 1, 2 or 3, got {order}")
    ts = check_grid(timesteps, schedule, strict=True)
    n = len(ts) - 1
    hist: list[tuple[Tensor, float]] = []  # (data prediction, lambda), newest first
    last_x: Tensor | None = None
    last_order = 0
    for i in range(n):
        t = ts[i]
        a, s, lam = schedule.coeffs(t)
        eps = evaluate(eps_model, x, t, cond)
        m = (x - s * eps) / a
        if schedule.x0 is not None:  # diffusers' thresholding of the data prediction (never clip_sample)
            m = schedule.x0.apply(m, clip=False)
        evals = [EvalInfo(x, t, cond, eps, "outer")]
        if last_x is not None and (i - 1) not in disable_corrector:
            _, s_prev, lam_prev = schedule.coeffs(ts[i - 1])
            m_prev = hist[0][0]
            x = _uni_bh2(last_x, s_prev, lam_prev, (a, s, lam), m_prev, hist[1:], last_order, model_t=m)
        hist = ([(m, lam)] + hist)[:order]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, i + 1)
        if ts[i + 1] == CLEAN:
            this_order = 1
        x_next = _uni_bh2(x, s, lam, schedule.coeffs(ts[i + 1]), m, hist[1:], this_order)
        emit(callback, StepInfo(i, t, ts[i + 1], x, x_next, evals))
        last_x, last_order = x, this_order
        x = x_next
    return x
