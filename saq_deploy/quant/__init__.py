"""Deployable fake quantization for diffusion UNets: symmetric INT8 / INT4, zero point 0.

    cfg = preset("w8a8")
    layers = quantize_(unet, cfg)                   # in place; weight scales computed here
    init_act_steps(unet, run_calibration_batches)   # activation steps from data
    state, specs = quant_state_dict(unet), quant_layer_specs(unet)
    load_quant_state(fresh_unet, cfg, state, specs) # the identical fake-quant model

This package imports torch only: no samplers, calibration, export or runtimes.
"""

from saq_deploy.quant.api import quantize_
from saq_deploy.quant.attention import QuantAttnProcessor
from saq_deploy.quant.config import (
    DEFAULT_KEEP_8BIT,
    ActSpec,
    LayerSpec,
    QuantConfig,
    WeightSpec,
    preset,
)
from saq_deploy.quant.fake_quant import (
    ActQuantizer,
    QuantConv2d,
    QuantLayer,
    QuantLinear,
    WeightQuantizer,
    quant_layers,
    set_quant_enabled,
    set_weight_mode,
)
from saq_deploy.quant.observers import ActObserver, init_act_steps
from saq_deploy.quant.quantizer import (
    dequantize,
    fake_quant,
    per_block_scale,
    per_channel_scale,
    qrange,
    quantize,
)
from saq_deploy.quant.state import load_quant_state, quant_layer_specs, quant_state_dict
from saq_deploy.quant.timestep import active_timesteps, current_group_ids, timestep_groups

__all__ = [
    "DEFAULT_KEEP_8BIT",
    "ActObserver",
    "ActQuantizer",
    "ActSpec",
    "LayerSpec",
    "QuantAttnProcessor",
    "QuantConfig",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "WeightQuantizer",
    "WeightSpec",
    "active_timesteps",
    "current_group_ids",
    "dequantize",
    "fake_quant",
    "init_act_steps",
    "load_quant_state",
    "per_block_scale",
    "per_channel_scale",
    "preset",
    "qrange",
    "quant_layer_specs",
    "quant_layers",
    "quant_state_dict",
    "quantize",
    "quantize_",
    "set_quant_enabled",
    "set_weight_mode",
    "timestep_groups",
]
