"""Calibrated quantization state: integer weights, scales and steps, and the exact rebuild.

After calibration the integer weights are the source of truth: dequant = weight_int * scale. Per
quantized layer `name` the state holds

- `{name}.weight_int`   int8, the weight's shape (4-bit codes lie in [-8, 7]);
- `{name}.weight_scale` float32, (out, 1, 1, 1) / (out, 1) per channel, (out, in // block) per block;
- `{name}.act_step`     float32, (timestep_groups,), only for an initialized activation quantizer;
- `{name}.weight_fp`    float32, the weight's shape, only for a layer whose FP weight was changed
                        by calibration (SA-QLoRA merges LoRA into it, `lora_merged`): the weight the
                        codes were rounded from. Optional; states without it load as before.

With `attention_matmul`, per quantized diffusers Attention module `attn` the state also holds
`{attn}.{q,k,v,p}_quant.act_step` (initialized quantizers only) and the specs an entry
`{attn}: {"kind": "attention", "act_bits", "act_groups"}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from saq_deploy.errors import ConfigError
from saq_deploy.quant.api import _apply, _check_supported
from saq_deploy.quant.attention import (
    ATTN_QUANTIZERS,
    attention_quant_modules,
    has_attention_quant,
    install_attention_quant,
    planned_attention,
)
from saq_deploy.quant.config import LayerSpec, QuantConfig
from saq_deploy.quant.fake_quant import QuantLayer, quant_layers
from saq_deploy.quant.quantizer import qrange


def _kind(layer: nn.Module) -> str:
    return "conv2d" if isinstance(layer, nn.Conv2d) else "linear"


@torch.no_grad()
def quant_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Integer weights, weight scales and activation steps of every quantized layer (CPU tensors).

    A layer still in AdaRound "soft" mode contributes its current hard decision.
    """
    state: dict[str, Tensor] = {}
    for name, layer in quant_layers(model).items():
        state[f"{name}.weight_int"] = layer.int_weight().cpu().contiguous()
        state[f"{name}.weight_scale"] = layer.weight_quant.scale.detach().float().cpu().contiguous().clone()
        act = layer.act_quant
        if act is not None and act.initialized:
            state[f"{name}.act_step"] = act.step.detach().float().cpu().contiguous().clone()
        if getattr(layer, "lora_merged", False):
            state[f"{name}.weight_fp"] = layer.weight.detach().float().cpu().contiguous().clone()
    for name, attn in attention_quant_modules(model).items():
        for qn in ATTN_QUANTIZERS:
            act = getattr(attn, qn)
            if act.initialized:
                state[f"{name}.{qn}.act_step"] = act.step.detach().float().cpu().contiguous().clone()
    return state


def quant_layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """JSON-able description per quantized layer: kind, weight shape, LayerSpec fields."""
    specs: dict[str, dict[str, Any]] = {
        name: {"kind": _kind(layer), "weight_shape": list(layer.weight.shape), **layer.layer_spec.to_dict()}
        for name, layer in quant_layers(model).items()}
    for name, attn in attention_quant_modules(model).items():
        q = attn.q_quant
        specs[name] = {"kind": "attention", "act_bits": q.bits, "act_groups": q.groups,
                       **({"act_group_bits": list(q.group_bits)} if q.mixed_bits else {})}
    return specs


def _check_attention(model: nn.Module, config: QuantConfig, specs: Mapping[str, Mapping[str, Any]],
                     state: Mapping[str, Tensor]) -> dict[str, nn.Module]:
    """The Attention modules to re-quantize; the stored specs must match what `config` selects."""
    planned = planned_attention(model, config)
    if set(specs) != set(planned):
        missing, extra = sorted(set(planned) - set(specs)), sorted(set(specs) - set(planned))
        raise ConfigError(f"attention matmul specs disagree with the config (attention_matmul="
                          f"{config.attention_matmul}, skip={list(config.skip)}): missing {missing[:5]}, "
                          f"unexpected {extra[:5]}")
    for name, raw in specs.items():
        if has_attention_quant(planned[name]):
            raise ConfigError(f"attention {name!r} already has matmul quantizers: load into a fresh model")
        expected = {"kind": "attention", "act_bits": config.act.bits, "act_groups": config.act.timestep_groups,
                    **({"act_group_bits": list(config.act.group_bits)}
                       if any(b != config.act.bits for b in config.act.group_bits) else {})}
        if dict(raw) != expected:
            raise ConfigError(f"attention {name!r}: stored spec {dict(raw)} disagrees with the config's {expected}")
        for qn in ATTN_QUANTIZERS:
            step = state.get(f"{name}.{qn}.act_step")
            if step is not None and (step.numel() != config.act.timestep_groups or not bool((step > 0).all())):
                raise ConfigError(f"{name}.{qn}.act_step must hold {config.act.timestep_groups} positive steps, "
                                  f"got shape {tuple(step.shape)}")
    return planned


def _owner(key: str, attn_names: set[str]) -> str:
    """The spec name a state key belongs to (`{attn}.q_quant.act_step` belongs to `{attn}`)."""
    owner, _, _ = key.rpartition(".")
    head, _, quantizer = owner.rpartition(".")
    return head if quantizer in ATTN_QUANTIZERS and head in attn_names else owner


def _plan_from_specs(model: nn.Module, config: QuantConfig,
                     specs: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, nn.Module, LayerSpec]]:
    plan: list[tuple[str, nn.Module, LayerSpec]] = []
    for name, raw in specs.items():
        raw = dict(raw)
        kind, shape = raw.pop("kind", None), raw.pop("weight_shape", None)
        spec = LayerSpec.from_dict(raw)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"quantized layer {name!r} is not in this model (wrong architecture?)") from None
        if isinstance(module, QuantLayer) or not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ConfigError(f"layer {name!r} must be an unquantized Conv2d/Linear, got {type(module).__name__}")
        if kind != _kind(module) or (shape is not None and list(module.weight.shape) != list(shape)):
            raise ConfigError(f"layer {name!r}: stored {kind} {shape} does not match the model's "
                              f"{_kind(module)} {list(module.weight.shape)}")
        expected = config.layer_spec(name, is_linear=isinstance(module, nn.Linear))
        if expected != spec:
            raise ConfigError(f"layer {name!r}: stored spec {spec.to_dict()} disagrees with the config's "
                              f"{expected.to_dict() if expected else 'skip'}")
        plan.append((name, module, spec))
    return plan


def _get(state: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise ConfigError(f"quant state is missing {key!r}")
    return state[key]


def _check_entries(name: str, weight_shape: torch.Size, spec: LayerSpec, state: Mapping[str, Tensor]) -> None:
    codes, scale = _get(state, f"{name}.weight_int"), _get(state, f"{name}.weight_scale")
    if tuple(codes.shape) != tuple(weight_shape):
        raise ConfigError(f"{name}.weight_int has shape {tuple(codes.shape)}, the layer's weight {tuple(weight_shape)}")
    qmin, qmax = qrange(spec.weight_bits)
    if codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
        raise ConfigError(f"{name}.weight_int has values outside INT{spec.weight_bits} [{qmin}, {qmax}]")
    out = weight_shape[0]
    expected = ((out, weight_shape[1] // spec.block_size) if spec.granularity == "block"
                else (out, *([1] * (len(weight_shape) - 1))))
    if tuple(scale.shape) != expected or not bool((scale > 0).all()):
        raise ConfigError(f"{name}.weight_scale must be positive with shape {expected}, got {tuple(scale.shape)}")
    if spec.act_bits is None and f"{name}.act_step" in state:
        raise ConfigError(f"layer {name!r} has an act_step but its spec has no activation quantizer")
    merged = state.get(f"{name}.weight_fp")
    if merged is not None and (tuple(merged.shape) != tuple(weight_shape) or not bool(torch.isfinite(merged).all())):
        raise ConfigError(f"{name}.weight_fp must be finite with the layer's weight shape {tuple(weight_shape)}, "
                          f"got {tuple(merged.shape)}")
    step = state.get(f"{name}.act_step")
    if step is not None and (step.numel() != spec.act_groups or not bool((step > 0).all())):
        raise ConfigError(f"{name}.act_step must hold {spec.act_groups} positive steps, got shape {tuple(step.shape)}")


@torch.no_grad()
def load_quant_state(model: nn.Module, config: QuantConfig, state: Mapping[str, Tensor],
                     specs: Mapping[str, Mapping[str, Any]]) -> dict[str, QuantLayer]:
    """Quantize a fresh FP `model` in place and install `state`: rebuilds the calibrated model.

    Exactly the layers in `specs` are swapped (so an earlier `filter_fn` needs no repeating); each
    must agree with `config`. Each weight quantizer gets the stored codes ("hard" mode: dequant =
    weight_int * scale), so forward outputs equal the calibrated model's bit for bit; the FP
    weights stay as loaded (needed to resume AdaRound, or to compare with quantization off),
    except where the state has a `weight_fp` (merged LoRA), which replaces the layer's weight.
    With `config.attention_matmul` the Attention modules' matmul quantizers and processors are
    re-installed with their stored steps.
    """
    _check_supported(config)
    attn_specs = {n: s for n, s in specs.items() if s.get("kind") == "attention"}
    layer_specs = {n: s for n, s in specs.items() if n not in attn_specs}
    stray = sorted({_owner(k, set(attn_specs)) for k in state} - set(specs))
    if stray:
        raise ConfigError(f"quant state has entries for layers without a spec: {stray[:5]}")
    plan = _plan_from_specs(model, config, layer_specs)
    for name, module, spec in plan:  # check everything before the first swap
        _check_entries(name, module.weight.shape, spec, state)
    attention = _check_attention(model, config, attn_specs, state)
    for name, attn in attention.items():
        quantizers = install_attention_quant(attn, config.act.bits, config.act.timestep_groups, config.act.group_bits)
        for qn, q in quantizers.items():
            if f"{name}.{qn}.act_step" in state:
                q.set_step(state[f"{name}.{qn}.act_step"])
    layers = _apply(plan, model, "minmax")  # placeholder scales, overwritten below
    for name, layer in layers.items():
        if f"{name}.weight_fp" in state:  # calibration changed the FP weight (merged LoRA)
            layer.weight = nn.Parameter(state[f"{name}.weight_fp"].to(layer.weight).clone(),
                                        requires_grad=layer.weight.requires_grad)
            layer.lora_merged = True
        layer.weight_quant.scale.copy_(state[f"{name}.weight_scale"])
        layer.weight_quant.set_codes(state[f"{name}.weight_int"])
        step_key = f"{name}.act_step"
        if step_key in state:
            layer.act_quant.set_step(state[step_key])
    return layers

