"""Closed-form oracles for the quantizer maths, AdaRound, configs, timestep groups and observers."""

from __future__ import annotations

import pytest
import torch

from saq_deploy.errors import ConfigError
from saq_deploy.quant import adaround
from saq_deploy.quant.config import DEFAULT_KEEP_8BIT, ActSpec, QuantConfig, WeightSpec, preset
from saq_deploy.quant.observers import ActObserver
from saq_deploy.quant.quantizer import (
    dequantize,
    expand_scale,
    fake_quant,
    lp_error,
    per_block_scale,
    per_channel_scale,
    qrange,
    quantize,
)
from saq_deploy.quant.timestep import active_timesteps, current_group_ids, timestep_groups

torch.set_num_threads(1)


# --- quantizer -------------------------------------------------------------------------------

def test_qrange_exact():
    assert qrange(4) == (-8, 7)
    assert qrange(8) == (-128, 127)


def test_round_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, 0.51])
    q = quantize(x, torch.tensor(1.0), 8)
    assert q.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 0.0, 1.0]
    assert torch.signbit(q[3])  # -0.5 -> -0, as ONNX/TensorRT round it


@pytest.mark.parametrize("bits,lo,hi", [(4, -8, 7), (8, -128, 127)])
def test_clamp_both_ends(bits, lo, hi):
    x = torch.tensor([-1e6, lo - 0.6, lo - 0.4, hi + 0.4, hi + 0.6, 1e6])
    q = quantize(x, torch.tensor(1.0), bits)
    assert q.tolist() == [lo, lo, lo, hi, hi, hi]
    assert torch.equal(dequantize(q, torch.tensor(0.5)), q * 0.5)


def test_full_integer_range_reachable():
    x = torch.arange(-10.0, 10.0)
    assert quantize(x, torch.tensor(1.0), 4).unique().tolist() == list(range(-8, 8))


def test_per_channel_scale_shapes_and_minmax():
    w4 = torch.randn(6, 3, 3, 3)
    s4 = per_channel_scale(w4, 8, "minmax")
    assert s4.shape == (6, 1, 1, 1)
    amax = w4.abs().amax(dim=(1, 2, 3))
    assert torch.allclose(s4.flatten(), amax / 127)
    q = quantize(w4, s4, 8)
    assert torch.equal(q.abs().amax(dim=(1, 2, 3)), torch.full((6,), 127.0))  # each channel max -> qmax
    w2 = torch.randn(5, 7)
    s2 = per_channel_scale(w2, 4, "minmax")
    assert s2.shape == (5, 1)
    assert torch.equal(quantize(w2, s2, 4).abs().amax(dim=1), torch.full((5,), 7.0))


def test_zero_channel_gets_positive_scale():
    w = torch.randn(3, 4)
    w[1] = 0
    s = per_channel_scale(w, 8)
    assert bool((s > 0).all()) and torch.equal(quantize(w, s, 8)[1], torch.zeros(4))


def test_per_block_scale_shape_and_values():
    w = torch.randn(3, 128)
    s = per_block_scale(w, 4, 64, "minmax")
    assert s.shape == (3, 2)
    assert torch.allclose(s[:, 0], w[:, :64].abs().amax(dim=1) / 7)
    assert torch.allclose(s[:, 1], w[:, 64:].abs().amax(dim=1) / 7)
    full = expand_scale(s, w.shape, 64)
    assert full.shape == w.shape and torch.equal(full[:, 63], s[:, 0]) and torch.equal(full[:, 64], s[:, 1])
    conv = torch.randn(3, 128, 1, 1)
    assert per_block_scale(conv, 4, 64).shape == (3, 2)
    assert expand_scale(per_block_scale(conv, 4, 64), conv.shape, 64).shape == (3, 128, 1, 1)
    with pytest.raises(ConfigError, match="does not divide"):
        per_block_scale(torch.randn(3, 96), 4, 64)


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_scale_not_worse_than_minmax(bits):
    w = torch.randn(8, 256) * torch.linspace(0.1, 2, 8)[:, None]
    w[:, 0] *= 8  # outliers make clipping worthwhile
    for granular in (lambda m: per_channel_scale(w, bits, m), lambda m: expand_scale(per_block_scale(w, bits, 64, m), w.shape, 64)):
        s_mm, s_mse = granular("minmax"), granular("mse")
        for row in range(8):
            e_mm = lp_error(w[row], fake_quant(w, s_mm, bits)[row])
            e_mse = lp_error(w[row], fake_quant(w, s_mse, bits)[row])
            assert e_mse <= e_mm
        assert bool((s_mse <= s_mm).all())
    assert lp_error(w, fake_quant(w, per_channel_scale(w, bits, "mse"), bits)) < \
        lp_error(w, fake_quant(w, per_channel_scale(w, bits, "minmax"), bits))


def test_ste_gradient_inside_and_outside():
    # LSQ's rule: gradient 1 where qmin <= x/s <= qmax (bounds included), 0 beyond.
    x = torch.tensor([-300.0, -128.0, 0.3, 50.0, 127.0, 127.4, 400.0], requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)
    y = fake_quant(x, scale, 8)
    assert torch.equal(y.detach(), quantize(x.detach(), scale.detach(), 8))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_lsq_step_gradient_closed_form():
    x = torch.tensor([0.3, -0.7, 10.0])
    s = torch.tensor(0.5, requires_grad=True)
    fake_quant(x, s, 4).sum().backward()
    # v = x/s = [0.6, -1.4, 20]: round(v) - v = 0.4, 0.4; clipped -> qmax = 7; LSQ factor 1/sqrt(3*7).
    expected = (0.4 + 0.4 + 7.0) / (3 * 7) ** 0.5
    assert s.grad is not None and abs(float(s.grad) - expected) < 1e-5


# --- AdaRound --------------------------------------------------------------------------------

def test_adaround_init_reproduces_unrounded_weight():
    w = torch.randn(4, 16)
    s = per_channel_scale(w, 8)
    alpha = adaround.init_alpha(w, s)
    h = adaround.rectified_sigmoid(alpha)
    frac = w / s - torch.floor(w / s)
    assert torch.allclose(h, frac, atol=1e-5)
    assert torch.allclose(adaround.soft_quantize(w, s, alpha, 8), w, atol=1e-6)


def test_regularizer_values():
    def alpha_for(h: list[float]) -> torch.Tensor:
        return -torch.log((adaround.ZETA - adaround.GAMMA) / (torch.tensor(h) - adaround.GAMMA) - 1)

    zero_one = torch.tensor([-20.0, 20.0])  # h saturates at exactly 0 and 1
    assert adaround.rectified_sigmoid(zero_one).tolist() == [0.0, 1.0]
    assert float(adaround.round_regularizer(zero_one, 2.0)) == 0.0
    vals = [float(adaround.round_regularizer(alpha_for([h]), 4.0)) for h in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert abs(vals[2] - 1.0) < 1e-5 and max(vals) == vals[2]


def test_beta_schedule():
    assert adaround.beta_schedule(0, 1000) == (20.0, 0.0)  # warm-up: regulariser weight 0
    assert adaround.beta_schedule(199, 1000) == (20.0, 0.0)
    assert adaround.beta_schedule(200, 1000) == (20.0, 1.0)
    beta, weight = adaround.beta_schedule(600, 1000)
    assert abs(beta - 11.0) < 1e-9 and weight == 1.0
    assert adaround.beta_schedule(1000, 1000) == (2.0, 1.0)
    assert adaround.beta_schedule(5, 10, start=8, end=4, warmup=0.0).beta == 6.0


def test_hard_rounding_follows_alpha_sign():
    s = torch.tensor(1.0)
    w = torch.tensor([2.3, 2.3, -2.3, -2.3, 7.6])
    alpha = torch.tensor([-0.5, 0.5, -0.5, 0.5, 3.0])
    assert adaround.hard_int(w, s, alpha, 4).tolist() == [2.0, 3.0, -3.0, -2.0, 7.0]  # 8 clamps to 7


# --- configs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: WeightSpec(bits=3), "4, 8"),
    (lambda: ActSpec(bits=3), "4, 8"),
    (lambda: WeightSpec(bits=4, granularity="block", block_size=96), "64, 128"),
    (lambda: WeightSpec(bits=4, granularity="block"), "64, 128"),
    (lambda: WeightSpec(bits=8, granularity="block", block_size=64), "INT4"),
    (lambda: WeightSpec(block_size=64), "granularity='block'"),
    (lambda: WeightSpec(granularity="tensor"), "channel"),
    (lambda: WeightSpec(scale_method="entropy"), "minmax"),
    (lambda: ActSpec(timestep_groups=0), ">= 1"),
    (lambda: QuantConfig(num_train_timesteps=0), ">= 1"),
    (lambda: QuantConfig(skip="conv_in"), "patterns"),
    (lambda: preset("w2a2"), "w8a8"),
])
def test_config_errors(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_presets_and_roundtrip():
    w4a8 = preset("w4a8")
    assert (w4a8.weight.bits, w4a8.weight.granularity, w4a8.weight.block_size, w4a8.act.bits) == (4, "block", 64, 8)
    assert preset("w8a8").weight.bits == 8 and preset("w4a4").act.bits == 4
    assert w4a8.keep_8bit == DEFAULT_KEEP_8BIT
    d = w4a8.to_dict()
    assert d["version"] == 1
    assert QuantConfig.from_dict(d) == w4a8
    with pytest.raises(ConfigError, match="version"):
        QuantConfig.from_dict({**d, "version": 99})
    with pytest.raises(ConfigError, match="unknown"):
        QuantConfig.from_dict({**d, "extra": 1})


def test_layer_rules_first_match_and_linear_only_blocks():
    cfg = QuantConfig(weight=WeightSpec(bits=4, granularity="block", block_size=64), skip=("conv_in",))
    assert cfg.rule_for("conv_in") == "skip"  # skip beats keep_8bit
    assert cfg.rule_for("down_blocks.0.resnets.1.time_emb_proj") == "keep_8bit"
    assert cfg.rule_for("time_embedding.linear_1") == "keep_8bit"
    assert cfg.rule_for("up_blocks.0.resnets.0.conv_shortcut") == "keep_8bit"
    assert cfg.rule_for("down_blocks.0.resnets.0.conv1") == "main"
    conv = cfg.layer_spec("down_blocks.0.resnets.0.conv1", is_linear=False)
    lin = cfg.layer_spec("mid_block.attentions.0.to_q", is_linear=True)
    assert (conv.weight_bits, conv.granularity, conv.block_size) == (4, "channel", None)
    assert (lin.weight_bits, lin.granularity, lin.block_size) == (4, "block", 64)
    keep = cfg.layer_spec("conv_out", is_linear=False)
    assert (keep.weight_bits, keep.act_bits) == (8, 8)


# --- timestep groups -------------------------------------------------------------------------

def test_timestep_groups_equal_width():
    t = torch.tensor([0, 249, 250, 499, 500, 999, 1200, -3])
    assert timestep_groups(t, 4, 1000).tolist() == [0, 0, 1, 1, 2, 3, 3, 0]
    assert timestep_groups(torch.tensor(999.5), 2, 1000).tolist() == [1]
    assert timestep_groups(t, 1, 1000).tolist() == [0] * 8


def test_active_timesteps_context_nests_and_resets():
    assert current_group_ids() is None
    with active_timesteps(torch.tensor([1, 0])):
        with active_timesteps(torch.tensor([2])):
            assert current_group_ids().tolist() == [2]
        assert current_group_ids().tolist() == [1, 0]
    assert current_group_ids() is None


# --- observers -------------------------------------------------------------------------------

def test_observer_percentile_matches_torch_quantile_across_batches():
    data = [torch.randn(4, 3, 5, 5) * (i + 1) for i in range(3)]
    obs = ActObserver(8, method="percentile", percentile=99.0, tail_size=64)
    for x in data:
        obs.observe(x)
    full = torch.cat([d.flatten() for d in data]).abs()
    assert abs(obs.abs_percentile(0, 99.0) - float(torch.quantile(full, 0.99))) < 1e-5
    assert obs.tail[0].numel() == 64  # bounded memory
    assert abs(float(obs.compute_steps()[0]) - float(torch.quantile(full, 0.99)) / 127) < 1e-6


def test_observer_groups_minmax_and_bounded_reservoir():
    obs = ActObserver(8, groups=2, method="mse", reservoir_size=100)
    x = torch.ones(3, 50)
    x[0] *= 2.0
    x[2] *= 5.0
    obs.observe(x, torch.tensor([0, 1, 0]))
    assert obs.amax == [5.0, 1.0]
    assert obs.res_vals[0].numel() == 100 and obs.res_vals[1].numel() == 50
    steps = obs.compute_steps()
    assert steps.shape == (2,) and bool((steps > 0).all())
    mm = ActObserver(8, groups=2)
    mm.observe(x, torch.tensor([0, 1, 0]))
    assert torch.allclose(mm.compute_steps(), torch.tensor([5.0, 1.0]) / 127)


def test_inference_fake_quant_is_bit_identical_to_reference_formula():
    from saq_deploy.quant.quantizer import fake_quant

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, 5, 5, generator=g) * 3
    before = x.clone()
    for scale, bits in [(torch.tensor(0.0123), 8), (torch.rand(16, 1, 1, 1, generator=g) * 0.1 + 0.01, 4)]:
        qmin, qmax = (-128, 127) if bits == 8 else (-8, 7)
        ref = torch.clamp(torch.round(x / scale), qmin, qmax) * scale
        with torch.no_grad():
            assert torch.equal(fake_quant(x, scale, bits), ref)
        assert torch.equal(x, before)  # the input is never modified in place
