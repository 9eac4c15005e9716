"""Deployed numerics the calibrated fake-quant model does not have, added for as long as needed.

The fake-quant model quantizes layer *inputs* and weights. A deployment placement can add more:
the ONNX Runtime CPU export puts INT8 Q/DQ after every quantized conv (so ONNX Runtime fuses
DQ -> Conv -> Q into QLinearConv) with export-time scales, and stores those convs' biases as
INT32 at scale input x weight (what QLinearConv adds). A reference for "does the engine compute
what we exported" must do the same: :func:`deployed_numerics` rounds those outputs and swaps in
those biases, with the exact values read from the exported graph (``saq_deploy.export.placement``),
and restores the model on exit. Symmetric, zero point 0, round half to even (ONNX QuantizeLinear)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from saq_deploy.errors import ConfigError
from saq_deploy.quant.quantizer import fake_quant


@contextmanager
def deployed_numerics(model: nn.Module, output_scales: dict[str, float],
                      biases: dict[str, np.ndarray] | None = None, bits: int = 8) -> Iterator[None]:
    """Fake-quantize the output of each module in ``output_scales`` (name -> scale) and use the
    given FP32 bias values (name -> array) instead of the modules' own, inside the context."""
    biases = biases or {}
    modules = dict(model.named_modules())
    missing = sorted((set(output_scales) | set(biases)) - set(modules))
    if missing:
        raise ConfigError(f"the exported graph names {len(missing)} layer(s) this model does not have "
                          f"({', '.join(missing[:3])}); re-export the artifact")
    for name, b in biases.items():
        own = getattr(modules[name], "bias", None)
        if own is None or tuple(own.shape) != tuple(np.shape(b)):
            raise ConfigError(f"the exported graph's bias of '{name}' has shape {tuple(np.shape(b))}, the "
                              f"model's {None if own is None else tuple(own.shape)}; re-export the artifact")
    for name, scale in output_scales.items():
        if not scale > 0:
            raise ConfigError(f"output scale of '{name}' must be positive, got {scale}")
    handles, saved = [], {}

    def hook_for(scale: float):
        s = torch.tensor(float(scale))

        def hook(_module, _inputs, out):
            return fake_quant(out, s.to(out), bits)
        return hook

    try:
        with torch.no_grad():
            for name, b in biases.items():
                bias = modules[name].bias
                saved[name] = bias.detach().clone()
                bias.copy_(torch.as_tensor(np.asarray(b), dtype=bias.dtype))
        for name, scale in output_scales.items():
            handles.append(modules[name].register_forward_hook(hook_for(scale)))
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, b in saved.items():
                modules[name].bias.copy_(b)
