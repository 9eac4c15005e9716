"""The calibration-method registry is the one place method names and their traits live."""
import ast
from pathlib import Path

import pytest

from saq_deploy.calibrate.methods import METHOD_NAMES, METHODS, RUNNERS, get_method
from saq_deploy.calibrate.recipe import CalibrationSection, Recipe, load_recipe
from saq_deploy.calibrate.steps import _act_method
from saq_deploy.errors import BackendUnavailableError, ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_every_committed_recipe_names_a_registered_method():
    recipes = sorted((ROOT / "calibration").rglob("*.toml"))
    assert recipes
    for path in recipes:
        assert get_method(load_recipe(path).calibration.method).name in METHOD_NAMES, path


def test_unknown_method_is_one_clear_error():
    with pytest.raises(ConfigError, match="calibration.method = 'gptq' is not supported; choose one of: minmax"):
        get_method("gptq")
    with pytest.raises(ConfigError, match="calibration.method = 'gptq'"):
        CalibrationSection(method="gptq")


def test_every_entry_runs_somewhere():
    assert {m.runner for m in METHODS.values()} <= set(RUNNERS)
    # the MOTA methods are exactly the sampling-aware ones, one per way of training
    assert sorted(m.name for m in METHODS.values() if m.mota) == ["sa-ptq", "sa-qlora"]


def test_mota_reconstruction_refuses_a_first_order_data_sampler():
    with pytest.raises(ConfigError, match="needs a higher-order data sampler"):
        CalibrationSection(method="sa-ptq", sampler="ddim")
    CalibrationSection(method="brecq", sampler="ddim")  # same-point targets: fine


def test_method_check_refuses_bits_it_does_not_support():
    m = get_method("modelopt-int8")
    with pytest.raises((ConfigError, BackendUnavailableError), match="modelopt"):
        m.check("w4a8")
    get_method("minmax").check("w4a4")  # no restriction


def test_observer_baselines_fix_their_observer_others_follow_the_recipe():
    assert _act_method("percentile", "mse", 8) == "percentile"
    assert _act_method("brecq", "percentile", 8) == "percentile"
    assert _act_method("sa-ptq", "auto", 8) == "minmax" and _act_method("sa-ptq", "auto", 4) == "mse"


def test_auto_candidates_follow_bits_and_cost():
    from saq_deploy.calibrate.methods import auto_candidates

    w8 = auto_candidates("w8a8")
    assert "sa-ptq" in w8 and "sa-qlora" not in w8 and "percentile" not in w8
    w4 = auto_candidates("w4a8")
    assert w4.index("minmax") < w4.index("brecq") < w4.index("sa-qlora")  # cheapest first: a budget cuts the tail


def test_qlora_section_kept_only_for_fine_tuning_methods():
    assert "qlora" in Recipe().with_overrides({"calibration.method": "sa-qlora"}).to_dict()
    assert "qlora" not in Recipe().with_overrides({"calibration.method": "brecq"}).to_dict()


def test_cli_choices_are_the_registry():
    from saq_deploy.cli.calibrate import Method

    assert tuple(m.value for m in Method) == (*METHOD_NAMES, "auto")


@pytest.mark.parametrize("module", ["steps.py", "qlora.py", "recipe.py", "methods.py"])
def test_no_import_cycle_through_run(module):
    """run.py dispatches; the modules it dispatches to never import it back."""
    tree = ast.parse((ROOT / "saq_deploy" / "calibrate" / module).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "saq_deploy.calibrate.run" not in imported
