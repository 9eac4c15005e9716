"""The network stage of PTQ reconstruction (reconstruction.network_iters, calibrate.network_stage):
after the blocks, every block's rounding and activation steps trained jointly on the UNet's final
eps, towards the FP eps at the MOTA target point (sa-ptq) or the same point (brecq).

Oracles: network_iters = 0 is the block-only run (same recipe hash, same state); the final-eps
loss is measured here on re-collected trajectories, against the FP eps the sampler itself stored
(calibration seeds and held-out seeds), not through the stage's own code; the stage's targets equal
those stored eps (and their CFG combination on the class-conditional digits model); mota_weight = 0
makes sa-ptq's stage brecq's byte for byte. On an unconditional UNet with odd widths."""

from __future__ import annotations

import pytest
import torch

from saq_deploy.calibrate.artifact import load_artifact
from saq_deploy.calibrate.network_stage import network_targets
from saq_deploy.calibrate.recipe import Recipe
from saq_deploy.calibrate.reconstruct import rec_loss
from saq_deploy.calibrate.run import calibrate, recipe_hash
from saq_deploy.calibrate.steps import Records, collect_or_open
from saq_deploy.errors import ConfigError
from saq_deploy.models.loading import load_model
from tests.helpers import LDM_SCHEDULE, save_pipeline_folder, tiny_unet_uncond, train_briefly

TINY = {"calibration.num_samples": 4, "calibration.steps": 3, "reconstruction.iters": 6,
        "reconstruction.max_inputs": 32, "reconstruction.batch_size": 8, "quant.bits": "w4a8",
        "quant.weight_block_size": 0}  # widths 24 / 48: per-channel INT4
NET = {"reconstruction.network_iters": 100}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.set_num_threads(1)
    unet = train_briefly(tiny_unet_uncond(channels=3, widths=(24, 48)))
    return save_pipeline_folder(tmp_path_factory.mktemp("net") / "pipe", unet, scheduler_kwargs=LDM_SCHEDULE)


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    """Calibrated artifacts by (method, extra overrides), each calibrated once per module."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def run(method: str, **extra):
        key = (method, *sorted(extra.items()))
        if key not in done:
            out = root / f"a{len(done)}"
            done[key] = load_artifact(calibrate(_recipe(model, method, **extra), out))
        return done[key]
    return run


def _recipe(model, method: str, **extra) -> Recipe:
    return Recipe().with_overrides({**TINY, "model.spec": str(model), "calibration.method": method, **extra})


def _state(q) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in q.loaded.unet.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _records(model, tmp_path, method: str, seed: int = 0, **extra):
    """Trajectory data as the calibration collects it (another seed: held-out x_T)."""
    recipe = _recipe(model, method, **{"calibration.seed": seed, **extra})
    loaded = load_model(str(model))
    return collect_or_open(loaded, recipe, tmp_path / f"data{seed}", progress=False), loaded, recipe


@torch.no_grad()
def _final_eps_loss(q, ds) -> float:
    """The stage's loss, from the stored fields: quantized eps at the outer point vs the FP eps the
    DPM-Solver-2 sampler recorded at the intermediate point (unconditional: no CFG to combine)."""
    d = ds.load_fields(("x_outer", "t_outer", "eps_inter"))
    out = q.eps_model()(d["x_outer"], d["t_outer"].float())
    return float(rec_loss(out, d["eps_inter"]))


@pytest.mark.slow
def test_network_iters_zero_is_the_block_only_run(model, runs):
    plain, zero = _recipe(model, "sa-ptq"), _recipe(model, "sa-ptq", **{"reconstruction.network_iters": 0})
    assert "network_iters" not in plain.to_dict()["reconstruction"]  # old recipe hashes stay valid
    assert recipe_hash(plain) == recipe_hash(zero)
    a, b = runs("sa-ptq"), runs("sa-ptq", **{"reconstruction.network_iters": 0})
    assert _same(_state(a), _state(b)) and "network_stage" not in a.manifest


@pytest.mark.slow
def test_network_stage_lowers_the_final_eps_loss(model, runs, tmp_path):
    block, net = runs("sa-ptq"), runs("sa-ptq", **NET)
    assert not _same(_state(block), _state(net))
    info = net.manifest["network_stage"]
    assert info["iters"] == 100 and info["loss_after"] < info["loss_before"]
    assert "network stage: 100 iterations" in (net.path / "report.md").read_text()
    for seed in (0, 7):  # the calibration trajectories, then held-out ones
        ds = _records(model, tmp_path, "sa-ptq", seed)[0]
        before, after = _final_eps_loss(block, ds), _final_eps_loss(net, ds)
        assert after < 0.95 * before, (seed, before, after)
    # the manifest's before is the block-only network, measured on the same records
    assert info["loss_before"] == pytest.approx(_final_eps_loss(block, _records(model, tmp_path, "sa-ptq")[0]),
                                                rel=1e-5)


@pytest.mark.slow
def test_sa_ptq_stage_at_mota_weight_zero_is_brecq_stage(model, runs):
    brecq = _state(runs("brecq", **NET))
    zero = _state(runs("sa-ptq", **NET, **{"calibration.mota_weight": 0.0}))
    mota = _state(runs("sa-ptq", **NET))
    assert _same(zero, brecq)
    assert not _same(mota, brecq)


@pytest.mark.slow
def test_run_killed_in_the_network_stage_resumes_byte_identical(model, runs, tmp_path, monkeypatch):
    """The stage keeps no checkpoint of its own: the re-run restores the block checkpoint and runs
    the stage again from its seed, which must end where the uninterrupted run ended."""
    import saq_deploy.calibrate.network_stage as ns

    real = ns.run_network_stage

    def killed(*a, **k):
        raise KeyboardInterrupt

    out, recipe = tmp_path / "resumed", _recipe(model, "sa-ptq", **NET)
    monkeypatch.setattr(ns, "run_network_stage", killed)
    with pytest.raises(KeyboardInterrupt):
        calibrate(recipe, out)
    assert (tmp_path / ".resumed.partial" / "ckpt.safetensors").exists() and not out.exists()
    monkeypatch.setattr(ns, "run_network_stage", real)
    resumed = load_artifact(calibrate(recipe, out))
    assert _same(_state(resumed), _state(runs("sa-ptq", **NET)))
    assert resumed.manifest["network_stage"]["loss_after"] == runs("sa-ptq", **NET).manifest["network_stage"][
        "loss_after"]


@pytest.mark.parametrize("orientation", ["outer_to_intermediate", "intermediate_to_outer"])
def test_stage_targets_are_the_fp_eps_at_the_target_point(model, tmp_path, orientation):
    ds, loaded, recipe = _records(model, tmp_path, "sa-ptq", **{"calibration.orientation": orientation})
    recs = Records(ds, recipe, loaded.null_label, loaded.cond_table)
    other = "eps_inter" if orientation == "outer_to_intermediate" else "eps_outer"
    own = "eps_outer" if other == "eps_inter" else "eps_inter"
    stored = ds.load_fields((other, own))
    unet = loaded.unet.eval()
    assert torch.allclose(network_targets(unet, recs, 1.0, 1, 1000), stored[other], atol=1e-5)
    assert torch.allclose(network_targets(unet, recs, 0.0, 1, 1000), stored[own], atol=1e-5)
    mix = network_targets(unet, recs, 0.25, 1, 1000)
    assert torch.allclose(mix, 0.75 * stored[own] + 0.25 * stored[other], atol=1e-5)


@pytest.mark.slow
def test_digits_stage_targets_are_the_cfg_rows_of_the_stored_eps(tmp_path):
    """Class-conditional with CFG: Records holds each record with its label, then with the null
    label; the sampler stored uncond + cfg (cond - uncond) of the two at the intermediate point."""
    recipe = Recipe().with_overrides({"calibration.method": "sa-ptq", "calibration.num_samples": 2,
                                      "calibration.steps": 2, "reconstruction.max_inputs": 8})
    loaded = load_model(recipe.model.spec)
    ds = collect_or_open(loaded, recipe, tmp_path / "data", progress=False)
    recs = Records(ds, recipe, loaded.null_label, loaded.cond_table)
    tgt = network_targets(loaded.unet.eval(), recs, 1.0, 1, 1000)
    n = len(ds)
    assert len(tgt) == 2 * n and torch.equal(recs.target[2][n:], torch.full((n,), loaded.null_label))
    combined = tgt[n:] + recipe.calibration.cfg * (tgt[:n] - tgt[n:])
    assert torch.allclose(combined, ds.load_fields(("eps_inter",))["eps_inter"], atol=1e-4)


@pytest.mark.parametrize("method,key,value,match", [
    ("sa-ptq", "network_iters", -1, r"integer >= 0"),
    ("brecq", "network_lr_scale", 0.0, r"finite number > 0"),
    ("minmax", "network_iters", 10, r"reconstructs no blocks"),
    ("sa-qlora", "network_iters", 10, r"reconstructs no blocks"),
    ("qlora-mse", "network_lr_scale", 3.0, r"reconstructs no blocks"),
])
def test_bad_network_stage_setting_is_one_clear_error(method, key, value, match):
    with pytest.raises(ConfigError, match=match) as e:
        Recipe().with_overrides({"calibration.method": method, f"reconstruction.{key}": value})
    assert "\n" not in str(e.value)
