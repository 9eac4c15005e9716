"""A failed calibrate leaves nothing beside its output (issue 15 item 7)."""

import pytest

from saq_deploy.calibrate.recipe import Recipe
from saq_deploy.calibrate.run import calibrate
from saq_deploy.errors import SaqError


def test_failed_model_load_leaves_no_partial(tmp_path):
    recipe = Recipe().with_overrides({"model.spec": str(tmp_path / "no-such-model")})
    out = tmp_path / "art"
    with pytest.raises(SaqError):
        calibrate(recipe, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no '.art.partial', no 'art'
