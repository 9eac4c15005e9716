"""The parity gate's numerical floor (saq_deploy/validate/floor.py): the reference in float32
against itself in float64. Oracles: a smooth network (floor far above any gate threshold) and a
network that rounds at a tie-dense grid, where float32 summation error flips codes (floor low)."""

from __future__ import annotations

import types

import torch

from saq_deploy.validate.floor import FLOOR_MARGIN_DB, floor_verdict, numerical_floor


class _Net(torch.nn.Module):
    def __init__(self, step: float | None):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(256, 256), torch.nn.Linear(256, 64)
        self.step = step  # None: smooth; else round the hidden layer to this grid (a quantizer)

    def forward(self, x):
        h = self.b(self.a(x))
        if self.step is None:
            return h
        # the rounding residual in units of the step: what a quantized layer passes on as error,
        # and as sensitive to the float32 error of h as a deep quantized network's output is
        return (torch.round(h / self.step) * self.step - h) / self.step


def _calls(n=4):
    g = torch.Generator().manual_seed(1)
    return [types.SimpleNamespace(x=torch.randn(8, 256, generator=g), t=torch.zeros(8), cond=None) for _ in range(n)]


def _eps(net):
    return lambda x, t, cond: net(x.to(next(net.parameters()).dtype)).to(x.dtype)


def test_smooth_network_floor_is_far_above_the_gate_and_weights_come_back_float32():
    net = _Net(None)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    f = numerical_floor(_eps(net), net, _calls(), engine_mean_snr_db=10.0)
    assert f["measured"] and f["mean_snr_db"] > 100
    assert not f["at_floor"] and "real mismatch" in f["verdict"]
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_rounding_network_has_a_low_floor_and_an_engine_at_it_is_not_blamed():
    net, smooth = _Net(1e-5), _Net(None)  # a grid ~100 float32 ULPs of the outputs wide
    f = numerical_floor(_eps(net), net, _calls(), engine_mean_snr_db=0.0)
    g = numerical_floor(_eps(smooth), smooth, _calls(), engine_mean_snr_db=0.0)
    assert f["mean_snr_db"] < 45 and g["mean_snr_db"] > 100, (f["mean_snr_db"], g["mean_snr_db"])
    at, text = floor_verdict(f["mean_snr_db"] - FLOOR_MARGIN_DB / 2, f["mean_snr_db"])
    assert at and "numerical floor" in text and "cannot be met" in text


def test_verdict_margin():
    assert floor_verdict(27.1, 30.0)[0] and not floor_verdict(26.9, 30.0)[0]
    assert "3.1 dB below" in floor_verdict(26.9, 30.0)[1]
