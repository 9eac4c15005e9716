"""ClassifierFreeGuidance: one batched call, the right combination, pass-through without cond."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from saq_deploy.models.eps_model import TorchEpsModel
from saq_deploy.models.guidance import ClassifierFreeGuidance


class Recorder:
    """A fake eps model whose output depends on x, t and cond; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def __call__(self, x, t, cond=None, /):
        self.calls.append((x, t, cond))
        c = (
            torch.zeros(x.shape[0], dtype=x.dtype)
            if cond is None
            else cond.reshape(x.shape[0], -1)[:, 0].to(x.dtype)
        )
        return x * (1 + t.view(-1, 1, 1, 1) / 100) + c.view(-1, 1, 1, 1)


def test_one_batched_call_and_hand_computed_combination():
    rec = Recorder()
    cfg = ClassifierFreeGuidance(rec, 3.0, 10)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([500.0, 500.0], dtype=torch.float64)
    labels = torch.tensor([3, 7])
    out = cfg(x, t, labels)
    assert len(rec.calls) == 1
    bx, bt, bc = rec.calls[0]
    assert torch.equal(bx, torch.cat([x, x])) and torch.equal(bt, torch.cat([t, t]))
    assert torch.equal(bc, torch.tensor([10, 10, 3, 7]))  # [uncond; cond]
    eps_u = rec(x, t, torch.tensor([10, 10]))
    eps_c = rec(x, t, labels)
    assert torch.allclose(out, eps_u + 3.0 * (eps_c - eps_u), atol=1e-12, rtol=0)


def test_cond_none_passes_through():
    rec = Recorder()
    x = torch.randn(3, 1, 4, 4)
    t = torch.full((3,), 10.0)
    out = ClassifierFreeGuidance(rec, 5.0, 10)(x, t, None)
    assert len(rec.calls) == 1 and rec.calls[0][2] is None and rec.calls[0][0].shape[0] == 3
    assert torch.equal(out, rec(x, t, None))


@pytest.mark.parametrize("null_shape", [(5, 4), (1, 5, 4), (2, 5, 4)])
def test_encoder_state_null_cond_is_broadcast(null_shape):
    rec = Recorder()
    null = torch.full(null_shape, -1.0)
    cond = torch.randn(2, 5, 4)
    ClassifierFreeGuidance(rec, 2.0, null)(torch.randn(2, 1, 4, 4), torch.full((2,), 1.0), cond)
    bc = rec.calls[0][2]
    assert bc.shape == (4, 5, 4) and torch.all(bc[:2] == -1.0) and torch.equal(bc[2:], cond)


def test_matches_two_separate_unet_calls():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny UNet is far slower with 2 threads on a busy 2-core box
    try:
        _check_against_unet()
    finally:
        torch.set_num_threads(threads)


def _check_against_unet() -> None:
    torch.manual_seed(0)
    unet = (
        UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=8,
            num_class_embeds=11,
        )
        .double()
        .eval()
    )
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.full((2,), 321.0, dtype=torch.float64)
    labels = torch.tensor([0, 9])
    out = ClassifierFreeGuidance(TorchEpsModel(unet), 1.5, 10)(x, t, labels)
    with torch.no_grad():
        eps_u = unet(x, t, class_labels=torch.tensor([10, 10])).sample
        eps_c = unet(x, t, class_labels=labels).sample
    assert torch.allclose(out, eps_u + 1.5 * (eps_c - eps_u), atol=1e-10, rtol=0)
