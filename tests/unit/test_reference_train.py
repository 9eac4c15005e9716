"""The reference-model trainer is reproducible from its seed and writes a loadable diffusers folder."""

from __future__ import annotations

import json
import math

import pytest
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


def test_warmup_cosine_schedule_matches_its_closed_form():
    from saq_deploy.reference.training import warmup_cosine_lr

    lr, warmup, steps = 1e-3, 4, 12
    got = [warmup_cosine_lr(s, lr=lr, warmup=warmup, steps=steps) for s in range(steps)]
    want = [lr * (s + 1) / warmup if s < warmup else lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
            for s in range(steps)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[0] == lr / warmup and got[warmup - 1] == got[warmup] == lr  # warmup ends at the peak, no jump
    assert got[warmup + (steps - warmup) // 2] == pytest.approx(lr / 2) and 0 < got[-1] < got[-2]


def test_ema_update_ramps_its_decay_and_moves_every_pair():
    from saq_deploy.reference.training import deterministic_algorithms, ema_update

    ema, live = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ema2, live2 = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    for m, v in ((ema, 0.0), (live, 1.0), (ema2, 2.0), (live2, 4.0)):
        torch.nn.init.constant_(m.weight, v)
    ema_update([(ema, live), (ema2, live2)], step=0, max_decay=0.999)  # step 0: decay min(0.999, 1/10)
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.9)) and torch.allclose(ema2.weight, torch.tensor([[3.8]]))
    assert torch.equal(live.weight, torch.ones(2, 2))  # the live model is only read
    ema_update([(ema, live)], step=10**6, max_decay=0.5)  # late steps: capped at max_decay
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.95))
    before = torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError), deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled()
        raise RuntimeError
    assert torch.are_deterministic_algorithms_enabled() == before  # restored even on error


def test_noised_draws_timesteps_then_noise_from_the_one_generator():
    from saq_deploy.reference.train import build_scheduler
    from saq_deploy.reference.training import noised

    acp = build_scheduler(1000).alphas_cumprod.float()
    x0 = torch.linspace(-1, 1, 3 * 16).reshape(3, 1, 4, 4)
    xt, t, noise = noised(x0, acp, 1000, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the draw order is part of what the seed reproduces
    assert torch.equal(t, torch.randint(0, 1000, (3,), generator=g)) and torch.equal(noise, torch.randn(x0.shape, generator=g))
    a = acp[t].view(-1, 1, 1, 1)
    assert torch.allclose(xt, a.sqrt() * x0 + (1 - a).sqrt() * noise)
