"""What the calibrated fake-quant UNet says each exported layer must be: integer weight codes,
weight scales, activation step, and for Attention modules with matmul quantizers
(`QuantConfig.attention_matmul`) the steps of q, k, v and the softmax probabilities. Read straight
from the fake-quant modules, so the exported Q/DQ graph carries exactly the calibrated numbers."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from saq_deploy.errors import ConfigError


@dataclass
class LayerQuant:
    name: str  # module name, e.g. down_blocks.1.attentions.0.to_q
    op: str  # "conv" | "linear"
    weight_bits: int
    codes: np.ndarray  # int8 integer weight, the module's weight shape
    scale: np.ndarray  # float32: per output channel (O,), or per block (O, I // block_size)
    block_size: int | None
    act_bits: int | None
    act_step: float | None  # per-tensor step (timestep groups collapsed, see notes)
    act_groups: int = 1
    notes: list[str] = field(default_factory=list)
    act_group_steps: tuple[float, ...] = ()  # the calibrated step of each timestep group
    act_group_bits: tuple[int, ...] = ()  # each group's activation bits when they differ (else act_bits)


@dataclass
class AttentionQuant:
    name: str  # the diffusers Attention module, e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn1
    head_dim: int  # SDPA's default scale is head_dim ** -0.5 (what QuantAttnProcessor uses)
    act_bits: int
    steps: dict[str, float]  # ATTN_QUANTIZERS name -> per-tensor step (timestep groups collapsed)
    act_groups: int = 1
    notes: list[str] = field(default_factory=list)
    group_steps: dict[str, tuple[float, ...]] = field(default_factory=dict)  # per timestep group
    group_bits: tuple[int, ...] = ()  # each group's bits when they differ (else act_bits)


class ExportPlan(list):
    """The LayerQuant of every quantized Conv / Linear in module order (a plain list to its callers),
    plus ``attention``: the AttentionQuant of every Attention module with matmul quantizers."""

    def __init__(self, layers: list[LayerQuant], attention: list[AttentionQuant] | None = None) -> None:
        super().__init__(layers)
        self.attention = list(attention or [])

    @property
    def timestep_groups(self) -> int:
        """K: how many timestep groups the activation (and attention) steps have (1: none)."""
        return max([lq.act_groups for lq in self] + [aq.act_groups for aq in self.attention] + [1])

    def for_group(self, g: int) -> ExportPlan:
        """The plan of timestep group ``g``: the same weights, group g's activation and attention
        steps (static for that group: nothing collapsed, so no collapse notes)."""
        if not 0 <= g < self.timestep_groups:
            raise ConfigError(f"timestep group {g} out of range for {self.timestep_groups} groups")
        layers = [replace(lq, act_step=_pick(lq.act_group_steps, g, lq.act_step), notes=[],
                          act_bits=lq.act_group_bits[g] if lq.act_group_bits else lq.act_bits) for lq in self]
        attn = [replace(aq, steps={qn: _pick(aq.group_steps.get(qn, ()), g, s) for qn, s in aq.steps.items()},
                        notes=[], act_bits=aq.group_bits[g] if aq.group_bits else aq.act_bits)
                for aq in self.attention]
        return ExportPlan(layers, attn)

    def group_act_bits(self) -> list[int] | None:
        """Each group's activation bits (the main-spec layers'), or None when no quantizer has
        per-group bits (every group at the recipe's width: manifests as before)."""
        per = [lq.act_group_bits for lq in self if lq.act_group_bits]
        per += [aq.group_bits for aq in self.attention if aq.group_bits]
        return list(per[0]) if per else None


def _pick(steps: tuple[float, ...], g: int, default: float | None) -> float | None:
    """Group g's step; a quantizer with one group has the same step in every group."""
    if not steps:
        return default
    return steps[g] if len(steps) > 1 else steps[0]


def group_steps(steps: torch.Tensor) -> tuple[float, ...]:
    """Every group's step as plain floats (float32 values, as the collapsed step is)."""
    return tuple(float(v) for v in steps.detach().float().reshape(-1))


def collapse_steps(steps: torch.Tensor, group_bits: tuple[int, ...] = (), bits: int | None = None) -> float:
    """One static step for several timestep groups: the largest, so no group clips more than it did.
    With per-group bits, the largest of the groups at ``bits`` (the collapsed graph's width, the
    narrowest group's: see ``_collapsed_bits``)."""
    s = steps.detach().float().reshape(-1)
    if group_bits and bits in group_bits:
        s = s[torch.tensor([b == bits for b in group_bits])]
    return float(s.max())


def _mixed(q) -> tuple[int, ...]:
    return tuple(q.group_bits) if q.mixed_bits else ()


def _collapsed_bits(q) -> int:
    """The one graph's activation width: the narrowest group's (with that group's step range)."""
    return min(q.group_bits) if q.mixed_bits else q.bits


def _attention_plan(unet: torch.nn.Module) -> list[AttentionQuant]:
    from saq_deploy.quant.attention import ATTN_QUANTIZERS, attention_quant_modules

    out = []
    for name, attn in attention_quant_modules(unet).items():
        quants = {qn: getattr(attn, qn) for qn in ATTN_QUANTIZERS}
        if not all(q.enabled and q.initialized for q in quants.values()):
            raise ConfigError(f"attention '{name}' has a disabled or uninitialized matmul quantizer; calibrate first")
        groups = quants["q_quant"].groups
        notes = [f"{groups} timestep-group attention steps collapsed to one static step (their max)"] if groups > 1 else []
        gb, bits = _mixed(quants["q_quant"]), _collapsed_bits(quants["q_quant"])
        # the processor splits heads by the key's width (to_k's output features)
        out.append(AttentionQuant(name, attn.to_k.out_features // attn.heads, bits,
                                  {qn: collapse_steps(q.step, gb, bits) for qn, q in quants.items()}, groups, notes,
                                  {qn: group_steps(q.step) for qn, q in quants.items()}, gb))
    return out


def build_plan(unet: torch.nn.Module) -> ExportPlan:
    """One LayerQuant per QuantConv2d / QuantLinear, in module order, and the attention matmuls."""
    from saq_deploy.quant.fake_quant import QuantConv2d, quant_layers

    plan = []
    for name, layer in quant_layers(unet).items():
        wq = layer.weight_quant
        if not wq.enabled:
            raise ConfigError(f"layer {name} has weight quantization disabled; export needs a fully quantized artifact")
        codes = layer.int_weight().detach().cpu().numpy().astype(np.int8)
        scale = wq.scale.detach().float().cpu().numpy()
        scale = scale.reshape(scale.shape[0], -1) if wq.block_size else scale.reshape(-1)
        aq = layer.act_quant
        act_bits = act_step = None
        groups, notes, per_group, gb = 1, [], (), ()
        if aq is not None and aq.enabled:
            if not aq.initialized:
                raise ConfigError(f"layer {name} has an uninitialized activation quantizer; calibrate first")
            act_bits, groups, gb = _collapsed_bits(aq), aq.groups, _mixed(aq)
            act_step, per_group = collapse_steps(aq.step, gb, act_bits), group_steps(aq.step)
            if groups > 1:
                notes.append(f"{groups} timestep-group activation steps collapsed to one static step (their max)")
            if gb:
                notes.append(f"per-group activation bits {list(gb)} collapsed to {act_bits}-bit")
        plan.append(LayerQuant(name, "conv" if isinstance(layer, QuantConv2d) else "linear", wq.bits, codes,
                               scale.astype(np.float32), wq.block_size, act_bits, act_step, groups, notes,
                               per_group, gb))
    if not plan:
        raise ConfigError("the model has no quantized layers: nothing to export")
    return ExportPlan(plan, _attention_plan(unet))
