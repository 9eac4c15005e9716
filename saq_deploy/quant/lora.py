"""LoRA inside the fake-quant layers, merged *before* weight quantization (SA-QLoRA / EfficientDM).

A `LoRA` attached to a QuantConv2d / QuantLinear as the submodule ``lora`` changes the weight the
layer's WeightQuantizer sees: W_q = Q(W + B·A · alpha/r) (`_QuantMixin.effective_weight`). The
frozen FP weight W is untouched until `merge_lora_`, which writes W + B·A into a new weight
Parameter and fixes the integer codes with nearest rounding on the learned scales, so the merged
layer's forward equals the trained (unmerged) one bit for bit and the state holds its codes.

Why not `peft`: peft's LoRA layers wrap nn.Linear / nn.Conv2d and add B·A·x *beside* the base
output (y = W x + B A x); here the delta must go through the weight quantizer (one INT4 GEMM after
merging, which is what gets deployed), and peft would replace our QuantConv2d / QuantLinear with
its own wrappers, losing the fake-quant forward. It is also not a dependency of this project. The
LoRA here is ~40 lines inside our own modules.

Convolutions: the delta is a rank-r factorization of the flattened kernel, B (out, r) @ A (r,
in/groups·kh·kw). That is exactly the authors' pair "k×k conv with r outputs (same kernel, stride,
padding as the base) followed by a 1×1 conv" written in merged form, so it needs no extra conv at
training time, covers strided / grouped convs unchanged, and merges by a reshape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from saq_deploy.quant.fake_quant import ActQuantizer, QuantLayer, WeightQuantizer, quant_layers
from saq_deploy.quant.quantizer import quantize


class LoRA(nn.Module):
    """Low-rank weight delta ``(up @ down) * alpha / r`` reshaped to the layer's weight shape.

    ``down`` (A) gets Kaiming-uniform init (a = sqrt 5, as nn.Linear / the authors' code) and
    ``up`` (B) zeros, so an attached LoRA starts as an exact no-op. The rank is capped at
    min(out, fan_in) (a larger one adds parameters, not expressiveness)."""

    def __init__(self, weight_shape: torch.Size | tuple[int, ...], rank: int, alpha: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        out, fan_in = self.weight_shape[0], math.prod(self.weight_shape[1:])
        self.rank = max(1, min(int(rank), out, fan_in))
        self.scaling = float(alpha) / self.rank
        self.down = nn.Parameter(torch.empty(self.rank, fan_in))
        self.up = nn.Parameter(torch.zeros(out, self.rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5), generator=generator)

    def delta(self) -> Tensor:
        return (self.up @ self.down).mul(self.scaling).reshape(self.weight_shape)

    def extra_repr(self) -> str:
        return f"shape={self.weight_shape}, rank={self.rank}, scaling={self.scaling:g}"


def attach_lora_(model: nn.Module, names: list[str], rank: int, alpha: float, seed: int) -> dict[str, LoRA]:
    """Attach a LoRA to each named quantized layer (sorted by name, one seeded generator: the
    initial factors do not depend on dict order). Returns the LoRAs by layer name."""
    layers = quant_layers(model)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, LoRA] = {}
    for name in sorted(names):
        layer = layers[name]
        lora = LoRA(layer.weight.shape, rank, alpha, gen).to(layer.weight.device)
        layer.lora = lora
        out[name] = lora
    return out


def set_scale_trainable_(wq: WeightQuantizer, trainable: bool) -> None:
    """Turn the weight scale buffer into a Parameter (LSQ-trained) or back into a buffer.
    The state-dict key (``weight_quant.scale``) is the same either way."""
    is_param = "scale" in wq._parameters
    if trainable and not is_param:
        scale = wq._buffers.pop("scale")
        wq.scale = nn.Parameter(scale.detach().clone())
    elif not trainable and is_param:
        scale = wq._parameters.pop("scale")
        wq.register_buffer("scale", scale.detach().clone())


def trainable_parameters(model: nn.Module, frozen_layers: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """Freeze every parameter of ``model``, then enable exactly the QLoRA ones: LoRA factors,
    weight scales (made Parameters) and initialized activation steps. The quantizers of the
    layers named in ``frozen_layers`` stay as they are (SA-QLoRA: the keep_8bit layers). Returns
    the trainable parameters by name."""
    frozen = {f"{n}.{q}" for n in frozen_layers for q in ("weight_quant", "act_quant")}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in model.named_modules():
        if isinstance(m, WeightQuantizer) and name not in frozen:
            set_scale_trainable_(m, True)
    params: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if name in frozen:
            continue
        if isinstance(module, LoRA):
            params[prefix + "down"], params[prefix + "up"] = module.down, module.up
        elif isinstance(module, WeightQuantizer):
            params[prefix + "scale"] = module.scale
        elif isinstance(module, ActQuantizer) and module.initialized:
            params[prefix + "step"] = module.step
    for p in params.values():
        p.requires_grad_(True)
    return params


@torch.no_grad()
def clamp_positive_(params: dict[str, nn.Parameter], floor: float = 1e-8) -> None:
    """Weight scales and activation steps must stay > 0 (TensorRT: scales > 0)."""
    for name, p in params.items():
        if name.endswith((".scale", ".step")):
            p.clamp_(min=floor)


@torch.no_grad()
def merge_lora_(model: nn.Module) -> list[str]:
    """Merge every attached LoRA into its layer and fix the integer codes; freeze everything.

    Per LoRA layer: weight <- W + delta (the same float expression the unmerged forward used);
    then every layer's codes <- nearest rounding of its weight on the learned scale ("hard"
    mode), which is what the nearest-mode training forward computed. A merged layer is marked
    ``lora_merged`` so the quant state also stores the merged FP weight. Weight scales become
    buffers again. Returns the merged layer names."""
    merged: list[str] = []
    for name, layer in quant_layers(model).items():
        set_scale_trainable_(layer.weight_quant, False)
        if layer._modules.get("lora") is not None:
            w = layer.effective_weight().detach().clone()
            del layer.lora
            layer.weight = nn.Parameter(w, requires_grad=False)
            layer.lora_merged = True
            merged.append(name)
        requantize_(layer)  # layers without LoRA too: every layer ends with decided codes
    for p in model.parameters():
        p.requires_grad_(False)
    return merged


@torch.no_grad()
def requantize_(layer: QuantLayer) -> None:
    """Decide the layer's integer codes by nearest rounding of its current weight and scale."""
    wq = layer.weight_quant
    wq.set_codes(quantize(layer.weight.detach(), wq.full_scale(layer.weight.shape).detach(), wq.bits))
