"""`modelopt-int8`: NVIDIA ModelOpt's INT8 calibration rendered into our artifact format.

ModelOpt (``pip install 'saq-deploy[modelopt]'``) calibrates a deep copy of the FP UNet with
``mtq.INT8_DEFAULT_CFG``: weights per output channel (axis 0), inputs per tensor, "max"
calibration. Its amaxes then become our scales, so every downstream tool (ONNX export, TensorRT,
sampling, evaluation) reads the result like any other calibrated artifact:

- weight scale = per-channel weight amax / 127 (reshaped to our (out, 1[, 1, 1]) scale),
- activation step = input amax / 127, the same step for every timestep group (ModelOpt has one).

Layer set: exactly the layers our QuantConfig quantizes. The preset's own rules stay in the
config (it starts with "disable everything" and ends with LLM-oriented exclusions such as
``*proj_out.*``); two entries are appended after them: ``{"quantizer_name": "*", "enable": False}``,
then ``{"quantizer_name": "<layer>.weight_quantizer" / "<layer>.input_quantizer", "enable": True}``
for each of our layers. An entry without ``cfg`` only toggles ``enable`` and keeps the INT8
attributes the preset's ``*weight_quantizer`` / ``*input_quantizer`` entries set, so ModelOpt
calibrates our layer set with the preset's numerics and nothing else (its attention BMM and
output quantizers stay off). The comparison with our methods is therefore layer for layer.

ModelOpt is imported lazily (its import takes ~10 s); ``modelopt_available`` does not import it.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from saq_deploy.errors import BackendUnavailableError, ConfigError

logger = logging.getLogger(__name__)

QMAX_INT8 = 127
INSTALL_HINT = "pip install 'saq-deploy[modelopt]'"


def modelopt_available() -> bool:
    """True when ``nvidia-modelopt`` is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("modelopt") is not None
    except (ImportError, ValueError):
        return False


def check_int8(qcfg: Any) -> None:
    """ModelOpt's INT8 preset is W8A8: refuse any other quantization config."""
    if qcfg.weight.bits != 8 or qcfg.act.bits != 8 or not qcfg.act.enabled:
        raise ConfigError("modelopt-int8 is an INT8 baseline: use --bits w8a8")
    if any(b != 8 for b in getattr(qcfg.act, "group_bits", ())):
        raise ConfigError("modelopt-int8 is an INT8 baseline: leave quant.act_group_bits at 8 (or unset)")


def _fp_copy(unet: nn.Module) -> nn.Module:
    """A deep copy of ``unet`` with every fake-quant layer turned back into its plain torch layer."""
    from saq_deploy.quant.fake_quant import quant_layers

    fp = copy.deepcopy(unet)
    for name, layer in quant_layers(fp).items():
        parent_name, _, child = name.rpartition(".")
        parent = fp.get_submodule(parent_name) if parent_name else fp
        setattr(parent, child, layer.to_float())
    return fp.eval()


def modelopt_config(layer_names: list[str]) -> dict[str, Any]:
    """``mtq.INT8_DEFAULT_CFG`` restricted to ``layer_names`` (see the module docstring)."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    entries = list(cfg["quant_cfg"])
    entries.append({"quantizer_name": "*", "enable": False})
    for name in layer_names:
        entries.append({"quantizer_name": f"{name}.weight_quantizer", "enable": True})
        entries.append({"quantizer_name": f"{name}.input_quantizer", "enable": True})
    cfg["quant_cfg"] = entries
    return cfg


def _positive(amax: Tensor) -> Tensor:
    # Our convention (quant.quantizer._positive): an all-zero channel/input gets scale 1.0, since
    # every code is 0 anyway and TensorRT needs scales > 0.
    amax = amax.detach().float().cpu()
    return torch.where(amax > 0, amax, torch.ones_like(amax))


def _amax(quantizer: nn.Module | None) -> Tensor | None:
    if quantizer is None or not getattr(quantizer, "is_enabled", False):
        return None
    amax = getattr(quantizer, "amax", None)
    return None if amax is None else torch.as_tensor(amax).detach().float().cpu()


@torch.no_grad()
def apply_modelopt_int8(unet: nn.Module, qcfg: Any,
                        run_batches: Callable[[nn.Module], None]) -> dict[str, dict[str, Tensor]]:
    """Calibrate ``unet`` (already swapped by ``quantize_(unet, qcfg)``) with ModelOpt INT8.

    ``run_batches(model)`` must forward the calibration data through ``model`` (it is called with
    ModelOpt's quantized copy of the FP UNet). Sets every layer's weight scale and activation
    steps from ModelOpt's amaxes and marks the activation quantizers initialized; ``unet`` keeps
    its own modules (the copy is discarded). Returns ``{layer: {"weight_amax", "input_amax"}}``.
    """
    from saq_deploy.quant.fake_quant import quant_layers

    check_int8(qcfg)
    if not modelopt_available():
        raise BackendUnavailableError(f"method 'modelopt-int8' needs NVIDIA ModelOpt: {INSTALL_HINT}")
    import modelopt.torch.quantization as mtq

    ours = quant_layers(unet)
    if not ours:
        raise ConfigError("modelopt-int8: the quantization config selects no Conv2d/Linear layer")
    fp = _fp_copy(unet)
    mtq.quantize(fp, modelopt_config(list(ours)), forward_loop=run_batches)
    modules = dict(fp.named_modules())
    result: dict[str, dict[str, Tensor]] = {}
    for name, layer in ours.items():
        mod = modules.get(name)
        w_amax = _amax(getattr(mod, "weight_quantizer", None))
        if w_amax is None:
            raise RuntimeError(f"ModelOpt left layer {name!r} without a calibrated weight quantizer")
        scale = layer.weight_quant.scale
        if w_amax.numel() != scale.numel():
            raise RuntimeError(f"layer {name!r}: ModelOpt weight amax has {w_amax.numel()} values, "
                               f"expected one per output channel ({scale.numel()})")
        scale.copy_((_positive(w_amax) / QMAX_INT8).reshape(scale.shape).to(scale.device))
        layer.weight_quant.set_mode("nearest")
        result[name] = {"weight_amax": w_amax}
        if layer.act_quant is None:
            continue
        in_amax = _amax(getattr(mod, "input_quantizer", None))
        if in_amax is None:
            logger.warning("activation quantizer %s saw no data; left uninitialized (pass-through)", name)
            continue
        if in_amax.numel() != 1:
            raise RuntimeError(f"layer {name!r}: ModelOpt input amax is not per tensor (shape "
                               f"{tuple(in_amax.shape)})")
        step = _positive(in_amax.reshape(1)) / QMAX_INT8
        layer.act_quant.set_step(step.expand(layer.act_quant.groups))
        result[name]["input_amax"] = in_amax.reshape(())
    return result
