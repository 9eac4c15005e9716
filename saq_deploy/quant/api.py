"""`quantize_`: the one in-place verb that swaps Conv2d / Linear for fake-quant layers."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from saq_deploy.errors import ConfigError
from saq_deploy.quant.attention import quantize_attention_
from saq_deploy.quant.config import LayerSpec, QuantConfig
from saq_deploy.quant.fake_quant import QuantConv2d, QuantLayer, QuantLinear, compute_weight_scale

FilterFn = Callable[[nn.Module, str], bool]


def _skip_mha_projections(model: nn.Module) -> set[str]:
    # nn.MultiheadAttention reads out_proj.weight directly, so a swap there would be silently ignored.
    return {f"{name}.out_proj" if name else "out_proj"
            for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def _plan(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None) -> list[tuple[str, nn.Module, LayerSpec]]:
    """Resolve every layer's spec and check it before anything is mutated."""
    plan: list[tuple[str, nn.Module, LayerSpec]] = []
    mha = _skip_mha_projections(model)
    for name, module in model.named_modules():
        if name in mha or isinstance(module, (QuantConv2d, QuantLinear)):
            continue  # already swapped (e.g. an earlier quantize_ with another filter)
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        is_linear = isinstance(module, nn.Linear)
        spec = config.layer_spec(name, is_linear=is_linear)
        if spec is None:
            continue
        if not name:
            raise ConfigError("quantize_ needs a model that contains layers, not a bare Conv2d/Linear")
        if spec.granularity == "block" and module.in_features % spec.block_size:
            raise ConfigError(f"layer {name!r}: block_size {spec.block_size} does not divide its input dim "
                              f"{module.in_features}; use granularity='channel' or add it to keep_8bit/skip")
        plan.append((name, module, spec))
    return plan


def block_size_conflicts(model: nn.Module, config: QuantConfig) -> list[tuple[str, int]]:
    """(name, input width) of every Linear whose INT4 block size would not divide its input width.

    Only reads the model, so callers can check a config before any expensive work (calibration
    runs it before collecting trajectories); `quantize_` itself refuses the same layers."""
    mha = _skip_mha_projections(model)
    bad = []
    for name, module in model.named_modules():
        if name in mha or not isinstance(module, nn.Linear) or isinstance(module, QuantLinear):
            continue
        spec = config.layer_spec(name, is_linear=True)
        if spec is not None and spec.granularity == "block" and module.in_features % spec.block_size:
            bad.append((name, module.in_features))
    return bad


def _apply(plan: list[tuple[str, nn.Module, LayerSpec]], model: nn.Module,
           scale_method: str | None) -> dict[str, QuantLayer]:
    """Swap the planned layers; `scale_method` overrides the specs' (state loading uses cheap minmax)."""
    swapped: dict[str, QuantLayer] = {}
    for name, module, spec in plan:
        scale = compute_weight_scale(module.weight, spec, scale_method)
        layer: QuantLayer = (QuantLinear(module, spec, scale) if isinstance(module, nn.Linear)
                             else QuantConv2d(module, spec, scale))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        swapped[name] = layer
    return swapped


def _check_supported(config: QuantConfig) -> None:
    # The matmul quantizers are activation quantizers: with act quant off there is nothing to calibrate.
    if config.attention_matmul and not config.act.enabled:
        raise ConfigError("attention_matmul=True needs activation quantization (act.enabled=True)")


def quantize_(model: nn.Module, config: QuantConfig, *, filter_fn: FilterFn | None = None) -> dict[str, QuantLayer]:
    """Swap every Conv2d / Linear of `model` for QuantConv2d / QuantLinear, in place.

    Layers follow `config` (skip / keep_8bit patterns, then the main spec); `filter_fn(module, name)`
    returning False leaves a layer alone. Weight scales are computed here; activation steps stay
    uninitialized (pass-through) until `init_act_steps` or a calibration sets them. All checks run
    before the first swap, so a ConfigError leaves the model untouched. Returns the new layers by name.

    With `config.attention_matmul`, every diffusers Attention module not matched by `config.skip`
    (`filter_fn` does not apply) also gets q/k/v/probs matmul quantizers (see `quant.attention`).
    """
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    _check_supported(config)
    layers = _apply(_plan(model, config, filter_fn), model, None)
    quantize_attention_(model, config)
    return layers
