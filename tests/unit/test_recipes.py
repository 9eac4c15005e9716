"""Every committed recipe parses and validates; names follow <model>_<bits>_<method>[-<variant>].toml."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from saq_deploy.calibrate.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "calibration").glob("*.toml"))
TEMPLATES = sorted((ROOT / "calibration" / "templates").glob("*.toml"))
ABLATIONS = sorted((ROOT / "calibration" / "ablations").glob("*.toml"))


def test_all_bits_and_methods_present():
    names = {p.stem for p in RECIPES}
    for bits in ("w8a8", "w4a8", "w4a4"):
        for method in ("sa-ptq", "brecq", "minmax"):
            assert f"digits_{bits}_{method}" in names


@pytest.mark.parametrize("path", RECIPES + TEMPLATES + ABLATIONS, ids=lambda p: p.name)
def test_recipe_valid(path):
    r = load_recipe(path)
    # every value written in the TOML survives load -> to_dict -> from_dict, as the TOML itself says
    raw = tomllib.loads(path.read_text())
    # through JSON, as recipe.json stores it (tuples come back as the TOML's arrays)
    for data in (json.loads(json.dumps(d)) for d in (r.to_dict(), Recipe.from_dict(r.to_dict()).to_dict())):
        for section, values in raw.items():
            for key, value in values.items():
                assert data[section][key] == value, f"{path.name}: [{section}] {key}"
    assert Recipe.from_dict(r.to_dict()) == r
    if path in RECIPES:
        _, bits, method = path.stem.split("_")
        # a testbed variant's recipe names the variant: <method>-<variant> (digits_w4a4_sa-qlora-t8)
        variant = method.removeprefix(r.calibration.method + "-") != method
        assert r.quant.bits == bits and (method == r.calibration.method or variant), path.name


def test_overrides_and_roundtrip():
    r = Recipe().with_overrides({"quant.bits": "w4a8", "reconstruction.iters": 7, "calibration.seed": None})
    assert r.quant.bits == "w4a8" and r.reconstruction.iters == 7 and r.calibration.seed == 0
    assert Recipe.from_dict(r.to_dict()) == r
