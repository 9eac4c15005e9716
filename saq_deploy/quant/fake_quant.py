"""Fake-quant modules swapped in for Conv2d / Linear.

`QuantConv2d` / `QuantLinear` subclass the torch layers and share the original `weight` and `bias`
Parameters, so parameter names, FP state dicts and `isinstance(m, nn.Conv2d)` keep working. The
forward quantizes the input activation (`act_quant`, per tensor, one step per timestep group)
and the weight (`weight_quant`, per output channel or per input block), then runs the plain op.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saq_deploy.errors import ConfigError
from saq_deploy.quant import adaround
from saq_deploy.quant.config import LayerSpec
from saq_deploy.quant.quantizer import (
    act_grad_factor,
    expand_scale,
    fake_quant,
    lsq_grad_factor,
    per_block_scale,
    per_channel_scale,
    qrange,
    quantize,
)
from saq_deploy.quant.timestep import current_group_ids

WeightMode = Literal["nearest", "soft", "hard"]
WEIGHT_MODES: tuple[str, ...] = ("nearest", "soft", "hard")


class WeightQuantizer(nn.Module):
    """Symmetric weight quantizer with optional AdaRound.

    Modes: "nearest" (round half to even), "soft" (AdaRound training: differentiable in `alpha`),
    "hard" (decided integer codes: the `codes` buffer when set by `finish_adaround` / `set_codes`,
    else floor + (alpha >= 0)). The FP weight is never modified, so turning quantization off gives
    the FP layer back. `scale` is stored per channel (out, 1[, 1, 1]) or per block (out, in // bs).
    """

    def __init__(self, bits: int, scale: Tensor, block_size: int | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.block_size = block_size
        self.enabled = True
        self.mode: WeightMode = "nearest"
        self.register_buffer("scale", scale.detach().float().clone())
        self.codes: Tensor | None
        self.register_buffer("codes", None)  # int8, the weight's shape, once decided
        self.alpha: nn.Parameter | None
        self.register_parameter("alpha", None)

    def full_scale(self, weight_shape: torch.Size | tuple[int, ...]) -> Tensor:
        """The scale broadcast against the weight (blocked scales expanded along the input dim)."""
        return expand_scale(self.scale, weight_shape, self.block_size)

    def start_adaround(self, w: Tensor) -> nn.Parameter:
        """Create `alpha` so the soft weight equals the unrounded FP weight `w`; mode becomes "soft"."""
        self.alpha = nn.Parameter(adaround.init_alpha(w.detach(), self.full_scale(w.shape)))
        self.codes = None
        self.mode = "soft"
        return self.alpha

    def round_regularizer(self, beta: float) -> Tensor:
        """AdaRound's rounding regulariser over this layer's alpha."""
        if self.alpha is None:
            raise RuntimeError("round_regularizer needs AdaRound alpha: call start_adaround(weight) first")
        return adaround.round_regularizer(self.alpha, beta)

    @torch.no_grad()
    def finish_adaround(self, w: Tensor) -> Tensor:
        """Fix the rounding: store floor(w/s) + (alpha >= 0) as `codes`, drop alpha, mode "hard".
        Returns the int8 codes."""
        if self.alpha is None:
            raise RuntimeError("finish_adaround needs AdaRound alpha: call start_adaround(weight) first")
        self.set_codes(adaround.hard_int(w, self.full_scale(w.shape), self.alpha, self.bits))
        return self.codes

    @torch.no_grad()
    def set_codes(self, codes: Tensor) -> None:
        """Install decided integer codes (e.g. loaded from a quant state); mode becomes "hard"."""
        qmin, qmax = qrange(self.bits)
        if codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
            raise ValueError(f"codes outside the INT{self.bits} range [{qmin}, {qmax}]")
        self.codes = codes.detach().to(device=self.scale.device, dtype=torch.int8).clone()
        self.alpha = None
        self.mode = "hard"

    def set_mode(self, mode: WeightMode) -> None:
        """Switch mode; "soft" needs alpha, "hard" alpha or codes, "nearest" drops decided codes."""
        if mode not in WEIGHT_MODES:
            raise ConfigError(f"weight mode must be one of {WEIGHT_MODES}, got {mode!r}")
        if (mode == "soft" and self.alpha is None) or (mode == "hard" and self.alpha is None and self.codes is None):
            raise RuntimeError(f"weight mode {mode!r} needs AdaRound alpha: call start_adaround(weight) first")
        if mode == "nearest":
            self.codes = None
        self.mode = mode

    def int_codes(self, w: Tensor) -> Tensor:
        """Integer codes as a float tensor; "soft" reports the current hard decision."""
        s = self.full_scale(w.shape)
        if self.mode == "nearest":
            return quantize(w.detach(), s, self.bits)
        if self.mode == "hard" and self.codes is not None:
            return self.codes.to(s.dtype)
        return adaround.hard_int(w.detach(), s, self.alpha, self.bits)

    def int_weight(self, w: Tensor) -> Tensor:
        """The integer weight (int8 storage, also for 4-bit codes in [-8, 7])."""
        return self.int_codes(w).to(torch.int8)

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        s = self.full_scale(w.shape)
        if self.mode == "nearest":
            return fake_quant(w, s, self.bits)
        if self.mode == "soft":
            return adaround.soft_quantize(w, s, self.alpha, self.bits)
        return self.int_codes(w) * s

    def extra_repr(self) -> str:
        return f"bits={self.bits}, block_size={self.block_size}, mode={self.mode}, enabled={self.enabled}"


class ActQuantizer(nn.Module):
    """Per-tensor symmetric activation quantizer with an LSQ step per timestep group.

    Pass-through until `initialized` (set by `set_step` / observers). With groups > 1 each
    sample's step is picked from the group ids of `timestep.active_timesteps`. `group_bits` (one
    per group, optional) gives each group its own bit width (its qmin/qmax, for the forward, the
    observers' initial steps and the LSQ gradient); `bits` is then the layer's main width.
    """

    def __init__(self, bits: int, groups: int = 1, group_bits: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.bits = bits
        self.groups = groups
        gb = tuple(int(b) for b in group_bits) or (bits,) * groups
        if len(gb) != groups:
            raise ConfigError(f"group_bits {list(gb)} must give one bit width per group ({groups})")
        self.group_bits = gb
        self.enabled = True
        self.initialized = False  # a Python flag, so tracing/export sees a constant branch
        self.step = nn.Parameter(torch.ones(groups))

    @property
    def mixed_bits(self) -> bool:
        """Whether the groups have different bit widths (else every group runs at `bits`)."""
        return any(b != self.bits for b in self.group_bits)

    @torch.no_grad()
    def set_step(self, step: Tensor) -> None:
        step = torch.as_tensor(step, dtype=torch.float32).reshape(-1).to(self.step.device)
        if step.numel() != self.groups or not bool((step > 0).all()):
            raise ValueError(f"need {self.groups} positive steps, got {step.tolist()}")
        self.step.copy_(step)
        self.initialized = True

    def step_for(self, x: Tensor) -> Tensor:
        """The step broadcast against x: (1,) for one group, (B, 1, ...) for per-sample groups."""
        if self.groups == 1:
            return self.step
        ids = self._ids(x)
        if ids.numel() == 1:
            return self.step[ids]
        return self.step[ids].reshape(-1, *([1] * (x.dim() - 1)))

    def _ids(self, x: Tensor) -> Tensor:
        ids = current_group_ids()
        if ids is None:
            raise RuntimeError(f"activation quantizer has {self.groups} timestep groups but no group ids are set: "
                               "wrap the forward in saq_deploy.quant.active_timesteps(...)")
        ids = ids.to(self.step.device)
        if ids.numel() > 0 and (int(ids.min()) < 0 or int(ids.max()) >= self.groups):
            raise RuntimeError(f"timestep group ids {ids.tolist()} out of range for {self.groups} groups")
        if ids.numel() != 1 and ids.numel() != x.shape[0]:
            raise RuntimeError(f"{ids.numel()} timestep group ids for a batch of {x.shape[0]}")
        return ids

    def forward(self, x: Tensor) -> Tensor:
        if not (self.enabled and self.initialized):
            return x
        if not self.mixed_bits:
            return fake_quant(x, self.step_for(x), self.bits, act_grad_factor(x, self.bits))
        if self.groups == 1:
            return fake_quant(x, self.step, self.group_bits[0], _grad_factor(x, self.group_bits[0]))
        ids = self._ids(x)
        row_bits = torch.tensor(self.group_bits, device=ids.device)[ids]
        if ids.numel() == 1 or bool((row_bits == row_bits[0]).all()):
            b = int(row_bits[0])
            return fake_quant(x, self.step_for(x), b, _grad_factor(x, b))
        # a batch mixing groups of different widths: each width's rows at their own qmin/qmax
        step, out = self.step_for(x), torch.empty_like(x)
        for b in torch.unique(row_bits).tolist():
            rows = torch.nonzero(row_bits == b).reshape(-1)
            out[rows] = fake_quant(x[rows], step[rows], b, _grad_factor(x, b))
        return out

    def extra_repr(self) -> str:
        gb = f", group_bits={list(self.group_bits)}" if self.mixed_bits else ""
        return f"bits={self.bits}, groups={self.groups}{gb}, initialized={self.initialized}, enabled={self.enabled}"


def _grad_factor(x: Tensor, bits: int) -> float:
    """LSQ's factor of a group's step over the whole batch x (as with one width: every group's step
    counts the batch's elements), under ``batch_share``."""
    share = act_grad_factor(x, bits)
    return share if share is not None else lsq_grad_factor(x.numel(), bits)


def compute_weight_scale(weight: Tensor, spec: LayerSpec, method: str | None = None) -> Tensor:
    """Scale for a weight under `spec` (method defaults to spec.scale_method)."""
    method = method or spec.scale_method
    if spec.granularity == "block":
        return per_block_scale(weight, spec.weight_bits, spec.block_size, method)
    return per_channel_scale(weight, spec.weight_bits, method)


class _QuantMixin:
    """Shared quantizer setup and forward pieces of QuantConv2d / QuantLinear."""

    weight: nn.Parameter
    weight_quant: WeightQuantizer
    act_quant: ActQuantizer | None
    layer_spec: LayerSpec

    def _setup_quant(self, spec: LayerSpec, weight_scale: Tensor | None) -> None:
        if weight_scale is None:
            weight_scale = compute_weight_scale(self.weight, spec)
        self.layer_spec = spec
        self.weight_quant = WeightQuantizer(spec.weight_bits, weight_scale.to(self.weight.device), spec.block_size)
        self.act_quant = (ActQuantizer(spec.act_bits, spec.act_groups, spec.act_group_bits)
                          if spec.act_bits is not None else None)
        if self.act_quant is not None:
            self.act_quant.to(self.weight.device)

    def effective_weight(self) -> Tensor:
        """The weight the quantizer sees: the FP weight, plus the low-rank delta while a LoRA is
        attached (SA-QLoRA's W_q = Q(W + B·A), see `saq_deploy.quant.lora`)."""
        lora = self._modules.get("lora")
        return self.weight if lora is None else self.weight + lora.delta()

    def _quant_inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return x, self.weight_quant(self.effective_weight())

    def int_weight(self) -> Tensor:
        """The int8-stored integer weight (the source of truth after calibration)."""
        return self.weight_quant.int_weight(self.effective_weight())

    def fp_weight(self) -> Tensor:
        """The FP weight (never modified by quantization)."""
        return self.weight


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """Conv2d with fake-quant input and weight; shares `weight`/`bias` with the wrapped conv."""

    def __init__(self, conv: nn.Conv2d, spec: LayerSpec, weight_scale: Tensor | None = None) -> None:
        nn.Conv2d.__init__(self, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                           padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                           bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")
        self.weight = conv.weight
        self.bias = conv.bias
        self._setup_quant(spec, weight_scale)
        self.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        x, w = self._quant_inputs(x)
        return self._conv_forward(x, w, self.bias)

    def to_float(self) -> nn.Conv2d:
        """A plain Conv2d sharing this layer's weight and bias."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.groups,
                         bias=self.bias is not None, padding_mode=self.padding_mode, device="meta")
        conv.weight, conv.bias = self.weight, self.bias
        return conv.train(self.training)


class QuantLinear(_QuantMixin, nn.Linear):
    """Linear with fake-quant input and weight; shares `weight`/`bias` with the wrapped Linear."""

    def __init__(self, linear: nn.Linear, spec: LayerSpec, weight_scale: Tensor | None = None) -> None:
        nn.Linear.__init__(self, linear.in_features, linear.out_features, bias=linear.bias is not None,
                           device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self._setup_quant(spec, weight_scale)
        self.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        x, w = self._quant_inputs(x)
        return F.linear(x, w, self.bias)

    def to_float(self) -> nn.Linear:
        """A plain Linear sharing this layer's weight and bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear.train(self.training)


QuantLayer = QuantConv2d | QuantLinear


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """Every QuantConv2d / QuantLinear in `model`, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def set_quant_enabled(model: nn.Module, weights: bool, acts: bool) -> None:
    """Switch weight / activation fake-quant on or off everywhere (both off = the FP model, exactly)."""
    for m in model.modules():
        if isinstance(m, WeightQuantizer):
            m.enabled = weights
        elif isinstance(m, ActQuantizer):
            m.enabled = acts


def set_weight_mode(model: nn.Module, mode: WeightMode) -> None:
    """Set every weight quantizer's mode (e.g. "hard" once AdaRound has converged)."""
    for m in model.modules():
        if isinstance(m, WeightQuantizer):
            m.set_mode(mode)
