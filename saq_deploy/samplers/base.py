"""What every sampler shares: the callback records, grid validation, the model call and the
first-order (DDIM = DPM-Solver-1) transfer.

Samplers are small functions in the style of k-diffusion::

    sample_<name>(eps_model, x, schedule, timesteps, *, cond=None, callback=None, **knobs) -> Tensor

``timesteps`` is a grid from :func:`saq_deploy.schedules.get_timesteps`: evaluation points then
the terminal point. Coefficients are computed in float64 as Python floats, so ``x`` keeps its own
dtype and device and nothing synchronises with an accelerator.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import Tensor

from saq_deploy.errors import ConfigError
from saq_deploy.schedules.vp import CLEAN, VPSchedule

if TYPE_CHECKING:  # typing only: keeps `import saq_deploy.samplers` free of the models package
    from saq_deploy.models.eps_model import EpsModel

Role = Literal["outer", "intermediate"]


@dataclass
class EvalInfo:
    """One model evaluation: the model saw ``(x, timestep, cond)`` and returned ``eps``.

    ``role`` is ``"outer"`` at a grid point (the first-order point of the step) and
    ``"intermediate"`` at a point inside the step (DPM-Solver-2's (u_i, s_i), PLMS's warm-up
    predictor point). ``timestep`` is the shared timestep as a float; the model received it as a
    (B,) tensor.
    """

    x: Tensor
    timestep: float
    cond: Tensor | None
    eps: Tensor
    role: Role


@dataclass
class StepInfo:
    """One step ``x_from`` at ``t_from`` -> ``x_to`` at ``t_to`` and every evaluation it made."""

    index: int
    t_from: float
    t_to: float
    x_from: Tensor
    x_to: Tensor
    evals: list[EvalInfo] = field(default_factory=list)


StepCallback = Callable[[StepInfo], None]


class Sampler(Protocol):
    def __call__(
        self,
        eps_model: EpsModel,
        x: Tensor,
        schedule: VPSchedule,
        timesteps: Tensor | Sequence[float],
        *,
        cond: Tensor | None = None,
        callback: StepCallback | None = None,
    ) -> Tensor: ...


def check_grid(
    timesteps: Tensor | Sequence[float], schedule: VPSchedule, *, strict: bool = False
) -> list[float]:
    """Validate a grid (>= 2 points, non-increasing -- decreasing if ``strict``, for solvers that
    divide by step sizes --, evaluation points in [0, T-1], terminal in [0, T-1] or CLEAN) and
    return it as Python floats."""
    ts = [float(t) for t in torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).tolist()]
    if len(ts) < 2:
        raise ConfigError("a timestep grid needs at least 2 points (one step and its terminal point)")
    top = schedule.num_train_timesteps - 1
    if any(not (0.0 <= t <= top) for t in ts[:-1]) or not (ts[-1] == CLEAN or 0.0 <= ts[-1] <= top):
        raise ConfigError(f"timesteps must lie in [0, {top}] (the last one may be CLEAN = -1), got {ts}")
    if any(b > a or (strict and b == a) for a, b in itertools.pairwise(ts)):
        raise ConfigError(f"timesteps must be {'decreasing' if strict else 'non-increasing'}, got {ts}")
    return ts


def evaluate(eps_model: EpsModel, x: Tensor, t: float, cond: Tensor | None) -> Tensor:
    """Call the model at one shared timestep, as a (B,) float tensor (float64 when x is, so
    fractional timesteps survive; float32 otherwise)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    tt = torch.full((x.shape[0],), t, dtype=dtype, device=x.device)
    return eps_model(x, tt, cond)


def first_order_step(schedule: VPSchedule, x: Tensor, eps: Tensor, t_from: float, t_to: float) -> Tensor:
    """DDIM (eta=0) = DPM-Solver-1: x_t = alpha_t/alpha_s x - sigma_t (e^h - 1) eps.

    ``sigma_t (e^h - 1)`` is written ``alpha_t sigma_s / alpha_s - sigma_t`` so that the CLEAN end
    point (sigma_t = 0, h = inf) gives the x0 prediction instead of 0 * inf.
    """
    a_s, s_s, _ = schedule.coeffs(t_from)
    a_t, s_t, _ = schedule.coeffs(t_to)
    return (a_t / a_s) * x - (a_t * s_s / a_s - s_t) * eps


def denoised_eps(schedule: VPSchedule, x: Tensor, eps: Tensor, t: float) -> Tensor:
    """eps as the DPM-Solver / UniPC schedulers use it once ``thresholding`` (the schedule's x0
    policy) has acted on the data prediction: x0 = (x - sigma eps) / alpha, thresholded, turned
    back into eps. Unchanged when the policy does not threshold (these schedulers never apply
    ``clip_sample``). The callbacks still report the model's own eps."""
    policy = schedule.x0
    if policy is None or not policy.applies(clip=False):
        return eps
    a, s, _ = schedule.coeffs(t)
    x0 = policy.apply((x - s * eps) / a, clip=False)
    return (x - a * x0) / s


def stride_target(t: float, stride: int | None, next_t: float, terminal: float) -> float:
    """Where a DDIM/PLMS step from ``t`` lands: the next grid point, or with diffusers' fixed
    ``stride`` ``t - stride`` (the terminal point once that is negative)."""
    if stride is None:
        return next_t
    target = t - stride
    return target if target >= 0 else terminal


def emit(callback: StepCallback | None, info: StepInfo) -> None:
    if callback is not None:
        callback(info)
