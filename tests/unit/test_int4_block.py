"""INT4 block size vs Linear input widths: refused in recipe terms before any data is collected."""

from __future__ import annotations

import pytest
from torch import nn

import saq_deploy.calibrate.trajectory as trajectory_mod
from saq_deploy.calibrate.recipe import Recipe
from saq_deploy.calibrate.run import calibrate, quant_config_for
from saq_deploy.calibrate.steps import check_block_sizes
from saq_deploy.cli.app import main
from saq_deploy.errors import ConfigError
from saq_deploy.quant.api import block_size_conflicts, quantize_
from saq_deploy.quant.fake_quant import QuantLinear
from tests.helpers import save_pipeline_folder, tiny_unet_uncond


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, 32)
        self.out = nn.Linear(32, 128)  # 32: not a multiple of 64 either
        self.ok = nn.Linear(128, 8)
        self.conv_in = nn.Linear(96, 8)  # keep_8bit name: INT8 per channel, never blocked


def _recipe(bs: int = 64, bits: str = "w4a8") -> Recipe:
    return Recipe().with_overrides({"quant.bits": bits, "quant.weight_block_size": bs, "calibration.method": "minmax"})


def test_conflicts_list_only_blocked_linears_whose_width_the_block_misses():
    net = Net(96)
    assert block_size_conflicts(net, quant_config_for(_recipe(64), 1000)) == [("proj", 96), ("out", 32)]
    assert block_size_conflicts(net, quant_config_for(_recipe(128), 1000)) == [("proj", 96), ("out", 32)]
    assert block_size_conflicts(net, quant_config_for(_recipe(0), 1000)) == []  # per channel
    assert block_size_conflicts(net, quant_config_for(_recipe(64, "w8a8"), 1000)) == []  # INT8: per channel


def test_message_names_layer_width_recipe_key_and_the_fix():
    with pytest.raises(ConfigError) as e:
        check_block_sizes(Net(96), _recipe(64), 1000)
    msg = str(e.value)
    assert "\n" not in msg
    assert "'proj'" in msg and "96" in msg and "quant.weight_block_size" in msg
    assert "neither 64 nor 128" in msg and "quant.weight_block_size = 0" in msg


def test_message_offers_the_block_size_that_fits():
    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(192, 8)  # 192 = 3 x 64: 64 divides it, 128 does not
            self.b = nn.Linear(128, 8)

    with pytest.raises(ConfigError, match=r"input width 192 of Linear layer 'a'; set quant\.weight_block_size = 64, or 0"):
        check_block_sizes(Wide(), _recipe(128), 1000)
    check_block_sizes(Wide(), _recipe(64), 1000)  # fits: no error


def test_per_channel_fallback_quantizes_the_96_wide_layer():
    net = Net(96)
    quantize_(net, quant_config_for(_recipe(0), 1000))
    assert isinstance(net.proj, QuantLinear) and net.proj.weight_quant.block_size is None
    assert net.proj.weight_quant.bits == 4


@pytest.fixture(scope="module")
def wide96(tmp_path_factory):
    """A diffusers UNet2DModel whose attention projections take 96 inputs."""
    unet = tiny_unet_uncond(widths=(32, 96))
    assert any(isinstance(m, nn.Linear) and m.in_features == 96 for m in unet.modules())
    return save_pipeline_folder(tmp_path_factory.mktemp("m") / "wide96", unet)


def test_calibrate_refuses_before_collecting_data(wide96, tmp_path, monkeypatch):
    calls = []
    real = trajectory_mod.collect_trajectories
    monkeypatch.setattr(trajectory_mod, "collect_trajectories", lambda *a, **k: calls.append(1) or real(*a, **k))
    recipe = Recipe().with_overrides({"model.spec": str(wide96), "quant.bits": "w4a8", "calibration.method": "minmax",
                                      "calibration.num_samples": 2, "calibration.steps": 2})
    with pytest.raises(ConfigError, match=r"quant.weight_block_size = 64 .* input width 96 .*attentions"):
        calibrate(recipe, tmp_path / "out")
    assert calls == []  # refused before any sampling
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no .partial folder


def test_cli_one_line_and_exit_code(wide96, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nspec = "{wide96}"\n[quant]\nbits = "w4a8"\n[calibration]\nmethod = "minmax"\n'
                      "num_samples = 2\nsteps = 2\n")
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "-c", str(recipe), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1
    assert err.startswith("error: quant.weight_block_size = 64") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
