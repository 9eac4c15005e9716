"""The reconstruction checkpoint is one self-describing file: a kill between writing
ckpt.safetensors and ckpt.json (an older block count left in the json) must not pair the new
state with the old count, which would reconstruct a block twice on resume."""
import json

import torch

from saq_deploy.calibrate.steps import CKPT_INFO, _read_ckpt, _write_ckpt
from saq_deploy.quant.api import quantize_
from saq_deploy.quant.config import preset
from tests.helpers import tiny_unet2d


def _quantized_unet():
    torch.manual_seed(0)
    unet = tiny_unet2d()
    quantize_(unet, preset("w8a8"))
    return unet


def test_state_file_carries_its_own_block_count(tmp_path):
    unet = _quantized_unet()
    _write_ckpt(tmp_path, unet, "hash-a", 3, [0.5, 0.25, 0.125])
    # the kill: the json of the previous checkpoint is what is left beside the new state
    (tmp_path / CKPT_INFO).write_text(json.dumps({"recipe_hash": "hash-a", "blocks_done": 2,
                                                  "block_losses": [0.5, 0.25], "layer_specs": []}))
    ckpt = _read_ckpt(tmp_path, "hash-a")
    assert ckpt["blocks_done"] == 3 and ckpt["block_losses"] == [0.5, 0.25, 0.125]
    assert ckpt["layer_specs"]  # the specs come from the state file too


def test_other_recipe_or_no_state_is_not_resumed(tmp_path):
    assert _read_ckpt(tmp_path, "hash-a") is None
    _write_ckpt(tmp_path, _quantized_unet(), "hash-a", 1, [0.5])
    assert _read_ckpt(tmp_path, "hash-b") is None
    (tmp_path / CKPT_INFO).unlink()  # killed before the json was ever written: the state alone resumes
    assert _read_ckpt(tmp_path, "hash-a")["blocks_done"] == 1
