"""Attention-matmul fake quantization: FP equivalence, minmax steps, state round trip, skip rules."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn

from saq_deploy.quant import (
    ActQuantizer,
    QuantAttnProcessor,
    QuantConfig,
    WeightSpec,
    init_act_steps,
    load_quant_state,
    quant_layer_specs,
    quant_state_dict,
    quantize_,
    set_quant_enabled,
)
from saq_deploy.quant.attention import ATTN_QUANTIZERS

torch.set_num_threads(1)

CFG = QuantConfig(weight=WeightSpec(scale_method="minmax"), attention_matmul=True)


def unet2d(seed: int = 0) -> nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       attention_head_dim=16).eval()


def unet_cond(seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 32), norm_num_groups=8, cross_attention_dim=24,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def _inputs(model: nn.Module) -> tuple:
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([5, 480])
    if model.config.get("cross_attention_dim") is None:
        return torch.randn(2, 1, 8, 8, generator=g), t
    return torch.randn(2, 4, 8, 8, generator=g), t, torch.randn(2, 7, 24, generator=g)


def _forward(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model(*_inputs(model)).sample


def _attn(model: nn.Module) -> dict[str, Attention]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("make", [unet2d, unet_cond])
def test_uninitialized_matches_default_processor(make):
    model = make()
    for attn in _attn(model).values():
        attn.set_processor(AttnProcessor2_0())
    ref = _forward(model)
    quantize_(model, CFG, filter_fn=lambda m, name: False)  # no layer swaps: the processors alone
    attns = _attn(model)
    assert attns and all(isinstance(a.processor, QuantAttnProcessor) for a in attns.values())
    assert all(isinstance(getattr(a, q), ActQuantizer) for a in attns.values() for q in ATTN_QUANTIZERS)
    torch.testing.assert_close(_forward(model), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [unet2d, unet_cond])
def test_minmax_init_small_error_and_exact_steps(make):
    model = make()
    ref = _forward(model)
    quantize_(model, CFG)
    set_quant_enabled(model, weights=False, acts=False)
    attns = _attn(model)
    # Independent capture of the matmul inputs: pre-hooks on the quantizers, FP everywhere.
    amax: dict[str, float] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple) -> None:
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))
        return fn

    handles = [getattr(a, q).register_forward_pre_hook(hook(f"{n}.{q}"))
               for n, a in attns.items() for q in ATTN_QUANTIZERS]
    _forward(model)
    for h in handles:
        h.remove()
    steps = init_act_steps(model, lambda: _forward(model))
    for n, a in attns.items():
        for q in ATTN_QUANTIZERS:
            quant = getattr(a, q)
            assert quant.initialized
            expected = torch.tensor([amax[f"{n}.{q}"] / 127])
            torch.testing.assert_close(quant.step.detach(), expected, rtol=1e-6, atol=0)
            torch.testing.assert_close(steps[f"{n}.{q}"], expected, rtol=1e-6, atol=0)
    # Only the attention matmuls quantized: a small but nonzero deviation from FP.
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.enabled = any(m is getattr(a, q) for a in attns.values() for q in ATTN_QUANTIZERS)
    out = _forward(model)
    assert 0.0 < _rel(out, ref) < 0.05
    set_quant_enabled(model, weights=True, acts=True)
    assert _rel(_forward(model), ref) < 0.05


def test_probs_step_matches_manual_recomputation():
    model = unet2d()
    quantize_(model, CFG)
    set_quant_enabled(model, weights=False, acts=False)
    attn = next(iter(_attn(model).values()))
    captured: dict[str, Tensor] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["h"] = args[0].detach() if args else kwargs["hidden_states"].detach()

    attn.register_forward_pre_hook(grab, with_kwargs=True)
    init_act_steps(model, lambda: _forward(model))
    h = captured["h"]  # (B, C, H, W) input of the spatial self-attention
    b, c = h.shape[:2]
    x = attn.group_norm(h.view(b, c, -1)).transpose(1, 2)
    split = lambda t: t.view(b, -1, attn.heads, c // attn.heads).transpose(1, 2)
    q, k, v = split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x))
    probs = (q @ k.transpose(-1, -2) * (c // attn.heads) ** -0.5).softmax(-1)
    for quant, t in ((attn.q_quant, q), (attn.k_quant, k), (attn.v_quant, v), (attn.p_quant, probs)):
        torch.testing.assert_close(quant.step.detach(), t.abs().max().reshape(1) / 127, rtol=1e-5, atol=0)


@pytest.mark.parametrize("make", [unet2d, unet_cond])
def test_state_round_trip_bit_identical(make):
    model = make()
    quantize_(model, CFG)
    init_act_steps(model, lambda: _forward(model))
    out = _forward(model)
    state = quant_state_dict(model)
    specs = json.loads(json.dumps(quant_layer_specs(model)))
    attns = _attn(model)
    for n in attns:
        assert specs[n] == {"kind": "attention", "act_bits": 8, "act_groups": 1}
        assert all(f"{n}.{q}.act_step" in state for q in ATTN_QUANTIZERS)
    fresh = make()
    load_quant_state(fresh, CFG, state, specs)
    assert all(isinstance(a.processor, QuantAttnProcessor) for a in _attn(fresh).values())
    assert torch.equal(_forward(fresh), out)
    assert torch.equal(_forward(copy.deepcopy(model)), out)  # quantizers travel with deepcopy


def test_state_mismatch_raises():
    from saq_deploy.errors import ConfigError

    model = unet2d()
    quantize_(model, CFG)
    state, specs = quant_state_dict(model), quant_layer_specs(model)
    with pytest.raises(ConfigError, match="attention matmul specs"):
        load_quant_state(unet2d(), QuantConfig(weight=CFG.weight), state, specs)


def test_default_config_leaves_processors_untouched():
    model = unet2d()
    before = {n: type(a.processor) for n, a in _attn(model).items()}
    quantize_(model, QuantConfig())
    assert {n: type(a.processor) for n, a in _attn(model).items()} == before
    assert not any(hasattr(a, "q_quant") for a in _attn(model).values())
    assert not any(v.get("kind") == "attention" for v in quant_layer_specs(model).values())


def test_skip_pattern_excludes_attention():
    model = unet2d()
    names = sorted(_attn(model))
    assert len(names) >= 2
    skipped = names[0]
    cfg = QuantConfig(weight=CFG.weight, attention_matmul=True, skip=(skipped,))
    quantize_(model, cfg)
    attns = _attn(model)
    assert not hasattr(attns[skipped], "q_quant")
    assert not isinstance(attns[skipped].processor, QuantAttnProcessor)
    assert all(isinstance(attns[n].processor, QuantAttnProcessor) for n in names[1:])
    init_act_steps(model, lambda: _forward(model))
    out = _forward(model)
    fresh = unet2d()
    load_quant_state(fresh, cfg, quant_state_dict(model), quant_layer_specs(model))
    assert not hasattr(_attn(fresh)[skipped], "q_quant")
    assert torch.equal(_forward(fresh), out)
