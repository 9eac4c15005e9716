"""VPSchedule against diffusers' alphas_cumprod, and the timestep grids against diffusers' set_timesteps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from saq_deploy.errors import ConfigError
from saq_deploy.schedules import CLEAN, SPACINGS, VPSchedule, get_timesteps

# diffusers' own numpy-2 __array__ deprecation noise (scheduler internals, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

F64 = torch.float64
BETAS = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "linear", "num_train_timesteps": 200, "beta_end": 0.05},
]


@pytest.mark.parametrize(
    "cfg", BETAS, ids=lambda c: f"{c['beta_schedule']}-{c.get('num_train_timesteps', 1000)}"
)
def test_alpha_sigma_lam_match_diffusers_at_integers(cfg):
    sched = UniPCMultistepScheduler(**cfg)  # any scheduler: they share the betas code
    acp = sched.alphas_cumprod.double()
    schedule = VPSchedule.from_diffusers(sched)
    assert schedule.num_train_timesteps == acp.numel()
    t = torch.arange(acp.numel(), dtype=F64)
    assert torch.allclose(schedule.alpha(t), acp.sqrt(), rtol=1e-14, atol=0)
    assert torch.allclose(schedule.sigma(t), (1 - acp).sqrt(), rtol=1e-12, atol=0)
    assert torch.allclose(schedule.lam(t), 0.5 * torch.log(acp / (1 - acp)), rtol=0, atol=1e-12)
    assert torch.all(schedule.lam(t)[1:] < schedule.lam(t)[:-1])  # lambda decreases with t


def test_from_diffusers_accepts_scheduler_config_dict_and_trained_betas():
    ref = DDIMScheduler(beta_schedule="scaled_linear").alphas_cumprod.double()
    for src in (
        DDIMScheduler(beta_schedule="scaled_linear"),
        PNDMScheduler(beta_schedule="scaled_linear").config,
    ):
        assert torch.equal(VPSchedule.from_diffusers(src).alphas_cumprod, ref)
    assert torch.equal(
        VPSchedule.from_diffusers({"beta_schedule": "linear"}).alphas_cumprod,
        DDIMScheduler().alphas_cumprod.double(),
    )
    betas = np.linspace(1e-3, 0.03, 50)
    trained = VPSchedule.from_diffusers({"trained_betas": betas.tolist(), "num_train_timesteps": 50})
    assert torch.allclose(trained.alphas_cumprod, torch.from_numpy(np.cumprod(1 - betas)), rtol=1e-6)
    with pytest.raises(ConfigError, match="squaredcos_cap_v2"):
        VPSchedule.from_diffusers({"beta_schedule": "quartic"})
    with pytest.raises(ConfigError):
        VPSchedule(torch.tensor([0.9, 0.5, 0.0]))  # zero terminal SNR


def test_fractional_timesteps_interpolate_log_alpha_and_t_from_lam_inverts_lam():
    schedule = VPSchedule.from_diffusers(DDIMScheduler())
    la = 0.5 * torch.log(schedule.alphas_cumprod)
    assert torch.allclose(schedule.log_alpha(torch.tensor([10.25], dtype=F64)), 0.75 * la[10] + 0.25 * la[11])
    t = torch.cat(
        [
            torch.rand(500, generator=torch.Generator().manual_seed(0), dtype=F64) * 999,
            torch.tensor([0.0, 1.0, 998.5, 999.0], dtype=F64),
        ]
    )
    assert torch.allclose(schedule.t_from_lam(schedule.lam(t)), t, rtol=0, atol=1e-9)
    lam = torch.linspace(float(schedule.lam(999)), float(schedule.lam(0)), 97, dtype=F64)
    assert torch.allclose(schedule.lam(schedule.t_from_lam(lam)), lam, rtol=0, atol=1e-9)
    with pytest.raises(ValueError):
        schedule.t_from_lam(torch.tensor([50.0], dtype=F64))  # beyond lam(0), not +inf
    with pytest.raises(ValueError):
        schedule.alpha(torch.tensor([1000.0], dtype=F64))
    with pytest.raises(ValueError):
        schedule.alpha(torch.tensor([-0.5], dtype=F64))


def test_clean_sentinel_is_finite_where_it_must_be():
    schedule = VPSchedule.from_diffusers(DDIMScheduler())
    c = torch.tensor([CLEAN], dtype=F64)
    assert schedule.alpha(c).item() == 1.0 and schedule.sigma(c).item() == 0.0
    assert math.isinf(schedule.lam(c).item()) and schedule.lam(c).item() > 0
    assert schedule.t_from_lam(torch.tensor([math.inf], dtype=F64)).item() == CLEAN
    assert schedule.coeffs(CLEAN) == (1.0, 0.0, math.inf)


# ---- grids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 25])
def test_uniform_grids_match_diffusers_timesteps(spacing, n):
    schedule = VPSchedule.from_diffusers(DDIMScheduler())
    ddim_grid = get_timesteps(spacing, n, schedule, convention="ddim")
    dpm_grid = get_timesteps(spacing, n, schedule, convention="dpm")
    ddim = DDIMScheduler(timestep_spacing=spacing)
    ddim.set_timesteps(n)
    pndm = PNDMScheduler(timestep_spacing=spacing, skip_prk_steps=True)
    pndm.set_timesteps(n)
    assert torch.equal(ddim_grid[:-1], ddim.timesteps.double())
    assert torch.equal(ddim_grid[:-1], torch.from_numpy(np.sort(pndm._timesteps)[::-1].astype(np.float64)))
    for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        sched = cls(timestep_spacing=spacing)
        sched.set_timesteps(n)
        assert torch.equal(dpm_grid[:-1], sched.timesteps.double()), cls.__name__
    assert ddim_grid[-1] == CLEAN and dpm_grid[-1] == CLEAN
    assert get_timesteps(spacing, n, schedule, terminal=0)[-1] == 0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_singlestep_linspace_and_steps_offset():
    schedule = VPSchedule.from_diffusers(DDIMScheduler())
    single = DPMSolverSinglestepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    single.set_timesteps(12)
    assert torch.equal(get_timesteps("linspace", 12, schedule, terminal=0)[:-1], single.timesteps.double())
    ddim = DDIMScheduler(steps_offset=1)
    ddim.set_timesteps(10)
    assert torch.equal(
        get_timesteps("leading", 10, schedule, convention="ddim", steps_offset=1)[:-1],
        ddim.timesteps.double(),
    )


@pytest.mark.parametrize("n", [1, 2, 5, 20])
def test_quadratic_and_logsnr_grids(n):
    schedule = VPSchedule.from_diffusers(DDIMScheduler())
    T = schedule.num_train_timesteps
    for spacing in ("quadratic", "logsnr"):
        for terminal in (CLEAN, 0.0):
            g = get_timesteps(spacing, n, schedule, terminal=terminal)
            assert g.dtype == F64 and g.numel() == n + 1
            assert g[0] == T - 1 and g[-1] == terminal
            assert torch.all(g[1:] < g[:-1]) and torch.all(g[:-1] >= 0)
    full = get_timesteps("logsnr", n, schedule, terminal=0)  # with t_min = 0 kept: uniform in lambda
    dlam = torch.diff(schedule.lam(full))
    assert torch.allclose(dlam, dlam.mean().expand_as(dlam), rtol=0, atol=1e-9)
    quad = get_timesteps("quadratic", n, schedule, terminal=0)  # sqrt of continuous time is uniform
    dsq = torch.diff(((quad + 1) / T).sqrt())
    assert torch.allclose(dsq, dsq.mean().expand_as(dsq), rtol=0, atol=1e-12)


def test_grid_errors_name_the_valid_values():
    schedule = VPSchedule.from_diffusers(DDIMScheduler())
    with pytest.raises(ConfigError, match=", ".join(SPACINGS)):
        get_timesteps("karras", 10, schedule)
    with pytest.raises(ConfigError, match="ddim, dpm"):
        get_timesteps("linspace", 10, schedule, convention="pndm")
    for bad in (0, -1, 2.5):
        with pytest.raises(ConfigError, match=">= 1"):
            get_timesteps("linspace", bad, schedule)
    with pytest.raises(ConfigError, match="cannot exceed"):
        get_timesteps("leading", 1001, schedule)
