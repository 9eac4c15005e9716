"""Optional fake quantization of the attention matmul inputs (`QuantConfig.attention_matmul`).

Each diffusers `Attention` module gets four per-tensor `ActQuantizer`s as submodules (`q_quant`,
`k_quant`, `v_quant`, `p_quant`, so `.to()`, deepcopy and state handling see them) and a
processor that computes what diffusers' `AttnProcessor2_0` computes, with explicit matmuls:

    scores = fq(q) @ fq(k)^T * head_dim**-0.5;  probs = softmax(scores);  out = fq(probs) @ fq(v)

Softmax stays FP. Uninitialized quantizers pass through, so the output then equals the default
processor's up to float rounding. diffusers is imported lazily: the quant package needs torch only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from saq_deploy.quant.config import QuantConfig
from saq_deploy.quant.fake_quant import ActQuantizer

ATTN_QUANTIZERS: tuple[str, ...] = ("q_quant", "k_quant", "v_quant", "p_quant")


def _attention_cls() -> type[nn.Module] | None:
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # no diffusers: no diffusers Attention modules either
        return None
    return Attention


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every diffusers `Attention` module of `model`, by name."""
    cls = _attention_cls()
    if cls is None:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def planned_attention(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """The Attention modules `config` quantizes: none unless attention_matmul, minus `skip` matches."""
    if not config.attention_matmul:
        return {}
    return {name: m for name, m in attention_modules(model).items() if config.rule_for(name) != "skip"}


def has_attention_quant(attn: nn.Module) -> bool:
    return isinstance(getattr(attn, "q_quant", None), ActQuantizer)


def attention_quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Attention modules that carry matmul quantizers (installed by `install_attention_quant`)."""
    return {name: m for name, m in attention_modules(model).items() if has_attention_quant(m)}


class QuantAttnProcessor:
    """`AttnProcessor2_0` with explicit, fake-quantized matmuls (quantizers live on the Attention module).

    Not an nn.Module on purpose: the quantizers are the attention module's own submodules, so this
    object holds no state and deepcopies/pickles trivially.
    """

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs: Any) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # SDPA's default scale (not attn.scale), which is what AttnProcessor2_0 uses.
        scores = attn.q_quant(query) @ attn.k_quant(key).transpose(-1, -2) * head_dim ** -0.5
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask
        probs = scores.softmax(dim=-1)
        hidden_states = attn.p_quant(probs) @ attn.v_quant(value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_attention_quant(attn: nn.Module, bits: int, groups: int,
                            group_bits: tuple[int, ...] = ()) -> dict[str, ActQuantizer]:
    """Register fresh q/k/v/probs quantizers on `attn` and switch it to `QuantAttnProcessor`."""
    device = next(attn.parameters()).device
    quantizers = {n: ActQuantizer(bits, groups, group_bits).to(device) for n in ATTN_QUANTIZERS}
    for n, q in quantizers.items():
        setattr(attn, n, q)
    attn.set_processor(QuantAttnProcessor())
    return quantizers


def quantize_attention_(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """Install matmul quantizers on every Attention module `config` selects (idempotent)."""
    installed: dict[str, nn.Module] = {}
    for name, attn in planned_attention(model, config).items():
        if not has_attention_quant(attn):  # a repeated quantize_ keeps calibrated steps
            install_attention_quant(attn, config.act.bits, config.act.timestep_groups, config.act.group_bits)
        installed[name] = attn
    return installed
