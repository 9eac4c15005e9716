"""Discrete-time variance-preserving (VP) noise schedule, in the language of DPM-Solver.

``x_t = alpha(t) x_0 + sigma(t) eps`` with ``alpha(t)^2 + sigma(t)^2 = 1`` and the half log-SNR
``lam(t) = log(alpha(t) / sigma(t))``. Timesteps are in the UNet's discrete scale
``0 ... T-1`` (``T = num_train_timesteps``); ``alpha(k) = sqrt(alphas_cumprod[k])`` at integers.
Fractional timesteps use DPM-Solver's convention (Lu et al. 2022, ``NoiseScheduleVP('discrete')``):
``log(alpha)`` is piecewise-linear between integer timesteps.

The fully clean end point that diffusers uses for the last step (DDIM ``set_alpha_to_one=True``,
DPM-Solver / UniPC ``final_sigmas_type="zero"``) is the sentinel timestep ``CLEAN = -1``:
``alpha = 1``, ``sigma = 0``, ``lam = +inf``. It is never fed to a model; it only ever appears as
the terminal point of a timestep grid. (Diffusers' other choice, ``set_alpha_to_one=False`` /
``final_sigmas_type="sigma_min"``, is simply the timestep ``0``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saq_deploy.errors import ConfigError
from saq_deploy.schedules.x0 import X0Policy

CLEAN: float = -1.0
"""Sentinel timestep for the noise-free end point (alpha=1, sigma=0, lam=+inf)."""

# diffusers' DDPMScheduler arguments that define the betas (everything else is sampling policy).
_BETA_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
)
_TOL = 1e-9  # slack when checking that a timestep / lambda lies in the table's range


def _as_f64(t: Tensor | float | Any) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64).detach().cpu()


@dataclass(frozen=True, eq=False)
class VPSchedule:
    """A VP schedule defined by the discrete ``alphas_cumprod`` table (stored as float64 on CPU).

    All methods take timesteps as float tensors (or Python numbers) in the discrete scale; values
    must lie in ``[0, T-1]`` or equal :data:`CLEAN`. They return float64 CPU tensors.
    """

    alphas_cumprod: Tensor = field(repr=False)
    # what the scheduler config asks samplers to do to x0 (clip_sample / thresholding); None: nothing
    x0: X0Policy | None = None
    _log_alpha: Tensor = field(init=False, repr=False)

    def __repr__(self) -> str:
        return f"VPSchedule(num_train_timesteps={self.num_train_timesteps})"

    def __post_init__(self) -> None:
        acp = _as_f64(self.alphas_cumprod).reshape(-1).clone()
        if acp.numel() < 2:
            raise ConfigError("alphas_cumprod needs at least 2 entries")
        if not bool(torch.all((acp > 0) & (acp <= 1))):
            raise ConfigError(
                "alphas_cumprod must lie in (0, 1] (a zero-terminal-SNR table is not supported)"
            )
        if not bool(torch.all(acp[1:] <= acp[:-1])):
            raise ConfigError("alphas_cumprod must be non-increasing")
        object.__setattr__(self, "alphas_cumprod", acp)
        object.__setattr__(self, "_log_alpha", 0.5 * torch.log(acp))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, scheduler_or_config: Any) -> VPSchedule:
        """Build from a diffusers scheduler, its ``config`` or a plain config dict.

        The betas are rebuilt with ``DDPMScheduler`` from the beta-defining keys
        (``beta_schedule`` linear / scaled_linear / squaredcos_cap_v2, ``beta_start``, ``beta_end``,
        ``num_train_timesteps``, ``trained_betas``), so every diffusers scheduler type yields the
        same float32 table diffusers itself uses.
        """
        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        try:
            items = dict(config)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"expected a diffusers scheduler or config dict, got {type(config).__name__}"
            ) from exc
        from diffusers import DDPMScheduler  # lazy: diffusers is heavy to import

        kwargs = {k: items[k] for k in _BETA_KEYS if k in items}
        try:
            ddpm = DDPMScheduler(**kwargs)
        except NotImplementedError as exc:
            raise ConfigError(
                f"unsupported beta_schedule {items.get('beta_schedule')!r}; valid: linear, scaled_linear, "
                "squaredcos_cap_v2 (or trained_betas)"
            ) from exc
        return cls(ddpm.alphas_cumprod, x0=X0Policy.from_config(items))

    def with_x0(self, policy: X0Policy | None) -> VPSchedule:
        """The same noise schedule with another x0 policy (None: no clipping / thresholding), for an
        ablation or a comparison with a diffusers scheduler configured otherwise."""
        return VPSchedule(self.alphas_cumprod, x0=policy)

    # -- table helpers ------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def _check_t(self, t: Tensor) -> Tensor:
        """Returns the mask of CLEAN entries; raises on anything outside [0, T-1] or NaN."""
        clean = t == CLEAN
        ok = clean | ((t >= -_TOL) & (t <= self.num_train_timesteps - 1 + _TOL))
        if not bool(torch.all(ok)):
            bad = t[~ok].reshape(-1)[:3].tolist()
            raise ValueError(
                f"timesteps must lie in [0, {self.num_train_timesteps - 1}] or equal CLEAN (-1), got {bad}"
            )
        return clean

    # -- the schedule -------------------------------------------------------------------------
    def log_alpha(self, t: Tensor | float) -> Tensor:
        """log(alpha(t)), piecewise-linear in t between integer timesteps; 0 at CLEAN."""
        t = _as_f64(t)
        clean = self._check_t(t)
        tc = t.clamp(0.0, self.num_train_timesteps - 1.0)
        lo = torch.floor(tc).long().clamp(max=self.num_train_timesteps - 2)
        w = tc - lo.to(torch.float64)
        la = self._log_alpha[lo] * (1.0 - w) + self._log_alpha[lo + 1] * w
        return torch.where(clean, torch.zeros_like(la), la)

    def alpha(self, t: Tensor | float) -> Tensor:
        """alpha(t) = sqrt(alphas_cumprod[t]) at integer t."""
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        """sigma(t) = sqrt(1 - alpha(t)^2); exactly 0 at CLEAN."""
        # -expm1(2 log a) = 1 - a^2 without cancellation near a = 1.
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def lam(self, t: Tensor | float) -> Tensor:
        """Half log-SNR lam(t) = log(alpha / sigma); +inf at CLEAN."""
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    def t_from_lam(self, lam: Tensor | float) -> Tensor:
        """Inverse of :meth:`lam` (exact inverse of the piecewise-linear log-alpha); +inf -> CLEAN."""
        lam = _as_f64(lam)
        la = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)  # log alpha from lambda
        clean = torch.isposinf(lam)
        # The table is decreasing in t: search the flipped (increasing) copy.
        table = torch.flip(self._log_alpha, [0])
        lo_ok = la >= table[0] - _TOL
        hi_ok = la <= table[-1] + _TOL
        if not bool(torch.all(clean | (lo_ok & hi_ok))):
            raise ValueError("lambda outside the schedule's range [lam(T-1), lam(0)] (and not +inf)")
        la_c = la.clamp(float(table[0]), float(table[-1]))
        j = torch.searchsorted(table, la_c.contiguous(), right=True).clamp(1, table.numel() - 1)
        x0, x1 = table[j - 1], table[j]
        w = torch.where(x1 > x0, (la_c - x0) / (x1 - x0), torch.zeros_like(la_c))
        # flipped index j-1+w  ->  timestep (T-1) - (j-1+w)
        t = (self.num_train_timesteps - 1) - ((j - 1).to(torch.float64) + w)
        return torch.where(clean, torch.full_like(t, CLEAN), t)

    def coeffs(self, t: float) -> tuple[float, float, float]:
        """(alpha, sigma, lam) at one timestep, as Python floats (what the samplers multiply by)."""
        la = self.log_alpha(float(t))
        a = math.exp(float(la))
        s2 = -math.expm1(2.0 * float(la))
        s = math.sqrt(s2)
        lam = math.inf if s2 == 0.0 else float(la) - 0.5 * math.log(s2)
        return a, s, lam
