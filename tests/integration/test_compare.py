"""`calibrate --method auto` / `--compare`: candidates calibrated on a model the tests build,
ranked by a distance we recompute independently, the winner kept as a normal artifact."""

from __future__ import annotations

import json

import pytest
import torch

from saq_deploy.calibrate.artifact import load_artifact, verify_artifact
from saq_deploy.calibrate.compare import CompareSettings, bootstrap_ci, candidate_recipe, compare_methods
from saq_deploy.calibrate.recipe import Recipe
from saq_deploy.calibrate.run import calibrate
from saq_deploy.cli.app import main
from saq_deploy.generate import SampleSettings, generate
from saq_deploy.models.loading import load_model
from tests.helpers import save_unet_folder, tiny_unet2d

TINY = {"calibration.num_samples": 4, "calibration.steps": 3, "reconstruction.iters": 4,
        "reconstruction.max_inputs": 48, "reconstruction.batch_size": 8}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    # class-conditional with a null class (CFG on), odd width 24: not the reference model
    folder = tmp_path_factory.mktemp("cmp") / "unet"
    return save_unet_folder(folder, tiny_unet2d(num_class_embeds=5), meta={"num_classes": 4, "null_label": 4})


def _recipe(model) -> Recipe:
    return Recipe().with_overrides({**TINY, "model.spec": str(model), "calibration.cfg": 1.5})


def _distance(artifact, eval_n, seed):
    """What the ranking should have measured, recomputed through the public sampling API."""
    fp = load_model(json.loads((artifact / "manifest.json").read_text())["model"]["spec"])
    q = load_artifact(artifact)
    st = SampleSettings(sampler="ddim", steps=3, cfg=1.5, seed=seed, n=eval_n, spacing="quadratic")
    kw = {"num_classes": fp.num_classes, "null_label": fp.null_label}
    with torch.no_grad():
        a, _ = generate(fp.eps_model(), fp.schedule(), fp.sample_shape, st, **kw)
        b, _ = generate(q.eps_model(), q.loaded.schedule(), q.loaded.sample_shape, st, **kw)
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1).mean().item()


@pytest.mark.slow
def test_compare_keeps_the_closest_candidate_as_a_verified_artifact(model, tmp_path):
    out = tmp_path / "best"
    lines: list[str] = []
    res = compare_methods(_recipe(model), out, CompareSettings(methods=("minmax", "mse", "brecq"), eval_n=6),
                          note=lines.append)
    scored = {r["method"]: r["fp"]["mean"] for r in res["rows"]}
    assert res["winner"] == min(scored, key=scored.get)
    m = verify_artifact(out)  # a normal artifact, hash chain intact
    assert m["method"] == res["winner"]
    assert _distance(out, 6, 1000) == pytest.approx(scored[res["winner"]], rel=1e-6)
    assert {p.name for p in (out / "comparison").iterdir()} == {"comparison.json", "report.md", "comparison.png"}
    report = (out / "comparison" / "report.md").read_text()
    assert f"{res['winner']} **(kept)**" in report and "95 %" in report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no candidates or shared data left
    assert any("brecq: calibrating" in ln for ln in lines)
    lead = res["lead"]
    assert lead["runner_up"] != res["winner"] and lead["mean"] >= 0 and lead["ci95"][0] <= lead["mean"] <= lead["ci95"][1]


@pytest.mark.slow
def test_a_candidate_a_killed_run_finished_is_reused(model, tmp_path):
    out = tmp_path / "best"
    r = _recipe(model)
    calibrate(candidate_recipe(r, "minmax"), tmp_path / ".best.compare" / "minmax")  # what the kill left
    before = (tmp_path / ".best.compare" / "minmax" / "calibrated.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    res = compare_methods(r, out, CompareSettings(methods=("minmax", "percentile"), eval_n=4,
                                                  keep_candidates=True), note=lines.append)
    assert any("minmax: reusing" in ln for ln in lines) and any("percentile: calibrating" in ln for ln in lines)
    kept = tmp_path / "best-candidates"
    loser = next(m for m in ("minmax", "percentile") if m != res["winner"])
    assert verify_artifact(kept / loser)["method"] == loser
    if res["winner"] == "percentile":
        assert (kept / "minmax" / "calibrated.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_budget_runs_the_first_candidate_and_skips_the_rest(model, tmp_path):
    res = compare_methods(_recipe(model), tmp_path / "b", CompareSettings(methods=("minmax", "brecq"),
                                                                           eval_n=4, budget_s=1e-3),
                          note=lambda _: None)
    assert res["winner"] == "minmax" and res["lead"] is None
    assert [r.get("skipped", "").startswith("budget") for r in res["rows"]] == [False, True]


@pytest.mark.parametrize("args, fragment", [
    (["--compare", "minmax"], "at least two different methods"),
    (["--compare", "minmax,gptq"], "--compare = 'gptq' is not supported"),
    (["--compare", "minmax,brecq", "--method", "brecq"], "drop --method"),
    (["--method", "auto", "--eval-n", "1"], "--eval-n must be an integer >= 2"),
    (["--method", "auto", "--budget", "0"], "--budget must be > 0"),
])
def test_bad_compare_options_exit_2_before_any_work(args, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", *args, "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and fragment in err, err
    assert not list(tmp_path.iterdir())


def test_bootstrap_interval_closed_forms():
    assert bootstrap_ci([0.25] * 10) == (0.25, 0.25)  # no spread: the interval is the point
    lo, hi = bootstrap_ci(list(range(100)))
    assert lo < 49.5 < hi and hi - lo < 25  # covers the mean, ~±1.96·σ/√n (σ ≈ 28.9 → ±5.7)
