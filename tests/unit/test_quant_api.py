"""quantize_, fake-quant modules, activation init, timestep groups and the exact state round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from saq_deploy.errors import ConfigError
from saq_deploy.quant import (
    ActQuantizer,
    ActSpec,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    WeightSpec,
    active_timesteps,
    fake_quant,
    init_act_steps,
    load_quant_state,
    preset,
    quant_layer_specs,
    quant_state_dict,
    quantize_,
    set_quant_enabled,
    set_weight_mode,
    timestep_groups,
)

torch.set_num_threads(1)

W4_BLOCK = WeightSpec(bits=4, granularity="block", block_size=64, scale_method="minmax")


def unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    # 64-wide so attention Linears (in 64) take blocks of 64; time_emb_proj etc. stay 8-bit.
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(64, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       attention_head_dim=32).eval()


class TinyNet(nn.Module):
    def __init__(self, fc_in: int = 64) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 4, 1))
        self.fc = nn.Linear(fc_in, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.conv_in(x)).flatten(1)
        return self.head(torch.relu(self.fc(h)))


def _unet_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 8, 8, generator=g), torch.tensor([5, 480, 990])


def _calibrate(model, groups: int = 1) -> None:
    x, t = _unet_inputs()

    def run() -> None:
        with active_timesteps(timestep_groups(t, groups, 1000)):
            model(x, t)

    init_act_steps(model, run)


def _forward(model, groups: int = 1) -> torch.Tensor:
    x, t = _unet_inputs()
    with torch.no_grad(), active_timesteps(timestep_groups(t, groups, 1000)):
        return model(x, t).sample


def test_quantize_unet_swaps_and_follows_patterns():
    model = unet()
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    cfg = QuantConfig(weight=W4_BLOCK, skip=("mid_block.attentions.*",))
    layers = quantize_(model, cfg)
    skipped = {n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
    assert skipped and all(n.startswith("mid_block.attentions.0.") for n in skipped)
    assert len(layers) + len(skipped) == n_layers
    for name in ("conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.0.resnets.0.time_emb_proj",
                 "up_blocks.0.resnets.0.conv_shortcut"):
        spec = layers[name].layer_spec
        assert (spec.weight_bits, spec.granularity, spec.act_bits) == (8, "channel", 8), name
    q = layers["down_blocks.1.attentions.0.to_q"]
    assert isinstance(q, QuantLinear) and q.layer_spec.granularity == "block"
    assert q.weight_quant.scale.shape == (64, 1)  # (out, in / 64)
    conv = layers["down_blocks.0.resnets.0.conv1"]
    assert isinstance(conv, QuantConv2d) and conv.layer_spec.granularity == "channel"
    assert conv.weight_quant.scale.shape == (64, 1, 1, 1)
    w_int = conv.int_weight()
    assert w_int.dtype == torch.int8 and int(w_int.min()) >= -8 and int(w_int.max()) <= 7
    assert model.get_submodule("down_blocks.0.resnets.0.conv1") is conv
    assert quantize_(model, cfg) == {}  # idempotent: quantized layers are left alone


def test_fake_quant_output_close_to_fp_and_toggle_is_exact():
    model = unet()
    fp = _forward(model)
    quantize_(model, preset("w8a8"))
    _calibrate(model)
    assert all(m.initialized for m in model.modules() if isinstance(m, ActQuantizer))
    q = _forward(model)
    rel = float((q - fp).norm() / fp.norm())
    assert 0 < rel < 0.1
    set_quant_enabled(model, weights=False, acts=False)
    assert torch.equal(_forward(model), fp)
    set_quant_enabled(model, weights=True, acts=True)
    assert torch.equal(_forward(model), q)


def test_tinynet_filter_and_keep_8bit():
    model = TinyNet()
    cfg = QuantConfig(weight=W4_BLOCK)
    layers = quantize_(model, cfg, filter_fn=lambda m, name: name != "head")
    assert set(layers) == {"conv_in", "body.0", "body.2", "fc"}
    assert type(model.head) is nn.Linear
    assert layers["conv_in"].layer_spec.weight_bits == 8  # keep_8bit by default
    assert layers["fc"].layer_spec.block_size == 64 and layers["body.2"].layer_spec.granularity == "channel"


@pytest.mark.parametrize("cfg,match", [
    (QuantConfig(weight=W4_BLOCK), r"'fc'.*96"),
    (QuantConfig(attention_matmul=True, act=ActSpec(enabled=False)), "needs activation quantization"),
])
def test_quantize_config_errors_leave_model_untouched(cfg, match):
    model = TinyNet(fc_in=96)
    with pytest.raises(ConfigError, match=match):
        quantize_(model, cfg)
    assert not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in model.modules())


def test_act_steps_minmax_from_data():
    model = TinyNet()
    layers = quantize_(model, QuantConfig(weight=WeightSpec(scale_method="minmax"), keep_8bit=()))
    xs = [torch.randn(2, 3, 4, 4), 3 * torch.randn(2, 3, 4, 4)]
    with torch.no_grad():  # weights quantized, activations not yet
        fp_fc_in = [model.body(model.conv_in(x)).flatten(1) for x in xs]

    def run() -> None:
        for x in xs:
            model(x)

    steps = init_act_steps(model, run)
    assert set(steps) == {f"{n}.act_quant" for n in layers}
    expected = max(float(x.abs().max()) for x in xs) / 127
    assert abs(float(layers["conv_in"].act_quant.step.detach()) - expected) < 1e-7
    expected_fc = max(float(h.abs().max()) for h in fp_fc_in) / 127
    assert abs(float(layers["fc"].act_quant.step.detach()) - expected_fc) < 1e-6


def test_timestep_group_steps_pick_group_per_sample():
    aq = ActQuantizer(8, groups=3)
    aq.set_step(torch.tensor([0.1, 0.2, 0.4]))
    x = torch.linspace(-3, 3, 20).repeat(4, 1)
    ids = torch.tensor([2, 0, 1, 2])
    with active_timesteps(ids):
        y = aq(x)
    for i, g in enumerate(ids.tolist()):
        assert torch.equal(y[i], fake_quant(x[i], torch.tensor([0.1, 0.2, 0.4])[g], 8))
    with active_timesteps(torch.tensor([1])):  # one id broadcasts over the batch
        assert torch.equal(aq(x), fake_quant(x, torch.tensor(0.2), 8))
    with pytest.raises(RuntimeError, match="active_timesteps"):
        aq(x)


def test_grouped_calibration_and_lsq_gradient_per_group():
    layer = nn.Sequential(nn.Linear(16, 8))
    cfg = QuantConfig(act=ActSpec(timestep_groups=2), keep_8bit=())
    q = quantize_(layer, cfg)["0"]
    small, large = torch.randn(2, 16), 10 * torch.randn(2, 16)
    t = torch.tensor([100, 100, 900, 900])

    def run() -> None:
        with active_timesteps(timestep_groups(t, 2, 1000)):
            layer(torch.cat([small, large]))

    init_act_steps(layer, run)
    step = q.act_quant.step.detach()
    assert abs(float(step[0]) - float(small.abs().max()) / 127) < 1e-7
    assert abs(float(step[1]) - float(large.abs().max()) / 127) < 1e-6
    with active_timesteps(torch.tensor([1, 1])):
        layer(torch.randn(2, 16) * 20).square().sum().backward()
    grad = q.act_quant.step.grad
    assert grad[0] == 0 and grad[1] != 0  # only the used group's step learns


def test_adaround_module_modes():
    lin = nn.Sequential(nn.Linear(64, 4))
    q = quantize_(lin, QuantConfig(weight=W4_BLOCK, act=ActSpec(enabled=False), keep_8bit=()))["0"]
    assert q.act_quant is None
    x = torch.randn(5, 64)
    fp = torch.nn.functional.linear(x, q.weight, q.bias)
    alpha = q.weight_quant.start_adaround(q.fp_weight())
    assert torch.allclose(lin(x), fp, atol=1e-5)  # soft weight starts at the FP weight
    lin(x).sum().backward()
    assert alpha.grad is not None and q.weight_quant.round_regularizer(2.0).item() > 0
    with torch.no_grad():
        alpha.copy_(torch.randn_like(alpha))
    set_weight_mode(lin, "hard")  # decided from alpha
    scale = q.weight_quant.full_scale(q.weight.shape)
    floor = torch.floor(q.weight.detach() / scale)
    codes = q.int_weight().float()
    assert torch.equal(codes, torch.clamp(floor + (alpha >= 0).float(), -8, 7))
    hard_out = lin(x)
    fixed = q.weight_quant.finish_adaround(q.fp_weight())  # codes stored, alpha dropped
    assert q.weight_quant.alpha is None and fixed.dtype == torch.int8 and torch.equal(fixed.float(), codes)
    assert torch.equal(lin(x), hard_out)
    assert torch.equal(q.weight, lin[0].fp_weight())  # the FP weight is never touched


@pytest.mark.parametrize("weight,groups", [(WeightSpec(scale_method="minmax"), 1), (W4_BLOCK, 2)])
def test_state_round_trip_bit_identical(weight, groups):
    cfg = QuantConfig(weight=weight, act=ActSpec(timestep_groups=groups))
    model = unet()
    layers = quantize_(model, cfg)
    _calibrate(model, groups)
    for name in ("down_blocks.1.attentions.0.to_k", "up_blocks.1.resnets.0.conv1"):  # some AdaRound layers
        wq = layers[name].weight_quant
        wq.start_adaround(layers[name].weight)
        with torch.no_grad():
            wq.alpha.add_(torch.randn_like(wq.alpha))
        wq.set_mode("hard")
    layers["up_blocks.1.resnets.0.conv1"].weight_quant.finish_adaround(layers["up_blocks.1.resnets.0.conv1"].weight)
    out = _forward(model, groups)
    state = quant_state_dict(model)
    specs = json.loads(json.dumps(quant_layer_specs(model)))
    assert state["conv_in.weight_int"].dtype == torch.int8 and state["conv_in.weight_scale"].dtype == torch.float32
    assert state["conv_in.act_step"].shape == (groups,)

    fresh = unet()
    with torch.no_grad():  # the integer weights, not the FP ones, must decide the result
        for m in fresh.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.add_(0.01 * torch.randn_like(m.weight))
    fresh_fp = _forward(fresh, groups)
    rebuilt = load_quant_state(fresh, cfg, state, specs)
    assert set(rebuilt) == set(layers)
    assert torch.equal(_forward(fresh, groups), out)
    set_quant_enabled(fresh, weights=False, acts=False)  # FP weights stay as loaded
    assert torch.equal(_forward(fresh, groups), fresh_fp)


def test_load_rejects_config_mismatch():
    model = unet()
    quantize_(model, preset("w8a8"))
    state, specs = quant_state_dict(model), quant_layer_specs(model)
    with pytest.raises(ConfigError, match="disagrees"):
        load_quant_state(unet(), dataclasses.replace(preset("w8a8"), act=ActSpec(bits=4)), state, specs)
    del state["conv_in.weight_scale"]
    with pytest.raises(ConfigError, match="missing"):
        load_quant_state(unet(), preset("w8a8"), state, specs)
