"""The reference-model trainer is reproducible from its seed and writes a loadable diffusers folder."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from saq_deploy.models.loading import load_model
from saq_deploy.reference.data import load_digits_16
from saq_deploy.reference.train import TrainConfig, train_reference


def test_digits_data():
    x, y = load_digits_16()
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert x.min() >= -1 and x.max() <= 1 and set(y.tolist()) == set(range(10))
    xt, _ = load_digits_16(split="train")
    xh, _ = load_digits_16(split="heldout")
    assert len(xt) + len(xh) == 1797 and abs(len(xh) - 360) <= 1


def test_training_is_reproducible(tmp_path):
    cfg = TrainConfig(steps=3, batch_size=8, warmup=2)
    a = train_reference(tmp_path / "a", cfg, progress=False)
    b = train_reference(tmp_path / "b", cfg, progress=False)
    wa = load_file(str(tmp_path / "a" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "diffusion_pytorch_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["final_loss_mean_last_200"] == b["final_loss_mean_last_200"]
    c = train_reference(tmp_path / "c", TrainConfig(steps=3, batch_size=8, warmup=2, seed=1), progress=False)
    assert c["final_loss_mean_last_200"] != a["final_loss_mean_last_200"]
    m = load_model(str(tmp_path / "a"))  # a standard diffusers folder our loader accepts
    assert m.null_label == 10 and json.loads((tmp_path / "a" / "training_log.json").read_text())["config"]["steps"] == 3
