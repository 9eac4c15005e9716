"""Reconstruction blocks of a diffusers UNet and capture of their inputs / outputs.

A block is a ResNet block, an attention block (or a whole Transformer2DModel in cross-attention
UNets), an up/down-sampler, or a stand-alone quantized layer outside all of those (conv_in, the
time-embedding MLP, conv_out). Blocks are listed in execution order, found by running the network
once with hooks, so no model-specific code is needed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


class _StopForward(Exception):
    """Raised from a hook to cut a forward pass short once the wanted block has been reached."""


def _block_types() -> tuple[type, ...]:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    types: list[type] = [ResnetBlock2D, Attention, Downsample2D, Upsample2D]
    try:
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        types.append(Transformer2DModel)
    except ImportError:  # older diffusers layout
        pass
    return tuple(types)


def _is_leaf_layer(m: nn.Module) -> bool:
    # QuantConv2d / QuantLinear subclass these, so FP and fake-quant layers both match
    return isinstance(m, (nn.Conv2d, nn.Linear))


def find_blocks(unet: nn.Module, run_once: Callable[[], Any]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every block in execution order; ``run_once`` runs one UNet forward."""
    types = _block_types()
    candidates = {n: m for n, m in unet.named_modules() if n and isinstance(m, types)}
    # outermost only: an Attention inside a Transformer2DModel belongs to that block
    outer = {n: m for n, m in candidates.items()
             if not any(n.startswith(o + ".") for o in candidates if o != n)}
    leaves = {n: m for n, m in unet.named_modules() if n and _is_leaf_layer(m)
              and not any(n.startswith(o + ".") for o in outer)}
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n) if n not in order else None)
             for n, m in {**outer, **leaves}.items()]
    try:
        with torch.no_grad():
            run_once()
    finally:
        for h in hooks:
            h.remove()
    named = {**outer, **leaves}
    return [(n, named[n]) for n in order]


@dataclass
class BlockInputs:
    """Positional and keyword inputs of a block over many samples, batched along dim 0."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    n: int

    def select(self, idx: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        pick = lambda v: v[idx] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == self.n else v
        return tuple(pick(a) for a in self.args), {k: pick(v) for k, v in self.kwargs.items()}

    def chunks(self, size: int) -> Iterable[tuple[Tensor, tuple[Any, ...], dict[str, Any]]]:
        for start in range(0, self.n, size):
            idx = torch.arange(start, min(self.n, start + size))
            yield (idx, *self.select(idx))


def _cat(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, Tensor) and first.ndim > 0:
        return torch.cat(values)
    return first  # non-batched values (None, flags, scalars) are the same for every call


def block_output(out: Any) -> Tensor:
    """The hidden-states tensor of a block's return value (tensor, tuple or diffusers output)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


def capture(
    block: nn.Module, feeds: Iterable[Callable[[], Any]], *, what: str
) -> BlockInputs | Tensor:
    """Run each feed (one UNet forward) and keep the block's inputs (``what="input"``) or its
    output (``what="output"``); the forward stops at the block, so later layers cost nothing."""
    got_args: list[tuple] = []
    got_kwargs: list[dict] = []
    got_out: list[Tensor] = []

    # .contiguous(): attention outputs come with channels-last strides, and torch's CPU GroupNorm
    # backward kernel for channels-last input crashes (segfault, torch 2.13)
    def keep(v):
        return v.detach().contiguous() if isinstance(v, Tensor) else v

    def pre_hook(_m, args, kwargs):
        got_args.append(tuple(keep(a) for a in args))
        got_kwargs.append({k: keep(v) for k, v in kwargs.items()})
        raise _StopForward

    def post_hook(_m, _args, _kwargs, out):
        got_out.append(keep(block_output(out)))
        raise _StopForward

    if what == "input":
        handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    elif what == "output":
        handle = block.register_forward_hook(post_hook, with_kwargs=True)
    else:
        raise ValueError(f"what must be 'input' or 'output', got {what!r}")
    try:
        with torch.no_grad():
            for feed in feeds:
                try:
                    feed()
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if what == "output":
        return torch.cat(got_out)
    args = tuple(_cat([a[i] for a in got_args]) for i in range(len(got_args[0])))
    kwargs = {k: _cat([kw[k] for kw in got_kwargs]) for k in got_kwargs[0]}
    n = next((v.shape[0] for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and v.ndim > 0), 0)
    return BlockInputs(args, kwargs, n)
