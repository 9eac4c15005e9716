"""The blended MOTA target (calibration.mota_weight w): (1 - w) FP(student's point) + w FP(the
other-order point). Oracles: w = 0 must be BRECQ exactly (the same-point target on the same
DPM-Solver-2 data), w = 1 SA-PTQ exactly; and for QLoRA the closed-form mix of the two FP eps a
teacher pass records. On an unconditional UNet with odd widths the method was not written around."""

from __future__ import annotations

import pytest
import torch

from saq_deploy.calibrate.artifact import load_artifact
from saq_deploy.calibrate.qlora import teacher_pairs
from saq_deploy.calibrate.recipe import Recipe
from saq_deploy.calibrate.run import calibrate
from saq_deploy.errors import ConfigError
from tests.helpers import LDM_SCHEDULE, save_pipeline_folder, tiny_unet_uncond, train_briefly

TINY = {"calibration.num_samples": 4, "calibration.steps": 3, "reconstruction.iters": 6,
        "reconstruction.max_inputs": 32, "reconstruction.batch_size": 8}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.set_num_threads(1)
    unet = train_briefly(tiny_unet_uncond(channels=3, widths=(24, 48)))
    return save_pipeline_folder(tmp_path_factory.mktemp("blend") / "pipe", unet, scheduler_kwargs=LDM_SCHEDULE)


def _state(model, tmp_path, method: str, **extra) -> dict[str, torch.Tensor]:
    recipe = Recipe().with_overrides({**TINY, "model.spec": str(model), "calibration.method": method, **extra})
    name = method + "".join(f"-{v}" for v in extra.values())
    unet = load_artifact(calibrate(recipe, tmp_path / name)).loaded.unet
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_weight_zero_is_brecq_one_is_sa_ptq_and_between_is_neither(model, tmp_path):
    brecq = _state(model, tmp_path, "brecq")
    mota = _state(model, tmp_path, "sa-ptq")
    zero = _state(model, tmp_path, "sa-ptq", **{"calibration.mota_weight": 0.0})
    half = _state(model, tmp_path, "sa-ptq", **{"calibration.mota_weight": 0.5})
    assert _same(zero, brecq)
    assert not _same(mota, brecq)  # the two targets differ on this model, so the test can fail
    assert not _same(half, brecq) and not _same(half, mota)


def _toy_eps(x, t, c=None):
    return 0.1 * x + 1e-3 * t.view(-1, *([1] * (x.dim() - 1))).to(x)


def test_qlora_blend_is_the_closed_form_mix_of_the_two_fp_eps():
    from diffusers import DDPMScheduler

    from saq_deploy.schedules import VPSchedule

    sched = VPSchedule.from_diffusers(DDPMScheduler(clip_sample=False).config)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    kw = {"spacing": "quadratic", "teacher": "dpm-solver-2", "target": "intermediate"}
    outer = teacher_pairs(_toy_eps, sched, x, None, 3, mota_weight=0.0, **kw)
    inter = teacher_pairs(_toy_eps, sched, x, None, 3, **kw)
    mix = teacher_pairs(_toy_eps, sched, x, None, 3, mota_weight=0.25, **kw)
    for (xo, to, eo), (xi, ti, ei), (xm, tm, em) in zip(outer, inter, mix, strict=True):
        assert torch.equal(xo, xi) and to == ti == tm  # same student point, only the target moves
        assert torch.allclose(eo, _toy_eps(xo, torch.full((2,), to)), atol=1e-6)  # w = 0: FP eps at the student
        assert not torch.allclose(eo, ei, atol=1e-4)
        assert torch.allclose(em, 0.75 * eo + 0.25 * ei, atol=1e-6)


@pytest.mark.parametrize("method,w,match", [
    ("brecq", 0.5, "MOTA methods only"), ("sa-ptq", 1.5, r"in \[0, 1\]"), ("sa-qlora", True, "must be a number")])
def test_bad_mota_weight_is_one_clear_error(method, w, match):
    with pytest.raises(ConfigError, match=match):
        Recipe().with_overrides({"calibration.method": method, "calibration.mota_weight": w})


QLORA = {"calibration.num_samples": 4, "calibration.steps": 3, "qlora.epochs": 2, "qlora.mixstep": (3,),
         "qlora.batch_size": 2, "qlora.rank": 4}


def _history(model, tmp_path, name: str, **extra) -> list[float]:
    recipe = Recipe().with_overrides({**QLORA, "model.spec": str(model), "calibration.method": "sa-qlora", **extra})
    out = calibrate(recipe, tmp_path / name)
    return [h["loss"] for h in load_artifact(out).manifest["qlora"]["loss_history"]]


@pytest.mark.slow
def test_two_stage_sa_qlora_trains_same_point_first_then_mota(model, tmp_path):
    """Same seeds throughout, so epoch 1 of the two-stage run is epoch 1 of the w = 0 run exactly,
    and epoch 2 leaves it (the MOTA target from then on)."""
    two = _history(model, tmp_path, "two", **{"qlora.same_point_epochs": 1})
    same = _history(model, tmp_path, "same", **{"calibration.mota_weight": 0.0})
    mota = _history(model, tmp_path, "mota")
    assert two[0] == same[0] and two[0] != mota[0]
    assert two[1] != same[1]


@pytest.mark.parametrize("method,k,match", [("qlora-mse", 1, "two-stage sa-qlora"),
                                            ("sa-qlora", 20, r"0\.\.epochs-1")])
def test_bad_same_point_epochs_is_one_clear_error(method, k, match):
    with pytest.raises(ConfigError, match=match):
        Recipe().with_overrides({"calibration.method": method, "qlora.same_point_epochs": k})
