"""Pure quantizer maths: symmetric, zero point 0, round half to even (the TensorRT Q/DQ rules).

Every function here works on plain tensors; modules live in `fake_quant.py`. A scale is always
stored in a shape that broadcasts against what it quantizes, except blocked weight scales, which
are stored as (out, in // block_size) and expanded with `expand_scale`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from saq_deploy.errors import ConfigError

ScaleMethod = Literal["minmax", "mse"]
SCALE_METHODS: tuple[str, ...] = ("minmax", "mse")

# The authors' `mse` init (q-diffusion / SAQ code): 80 shrink factors 1.00, 0.99, ..., 0.21 of the
# max, scored with an L_p error with p = 2.4.
MSE_CANDIDATES = 80
MSE_NORM = 2.4


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range for `bits`: 4 -> (-8, 7), 8 -> (-128, 127)."""
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ConfigError(f"bits must be an integer in 2..16, got {bits!r}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def quantize(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """clamp(round_half_even(x / scale)): integer values in a float tensor (ONNX QuantizeLinear)."""
    qmin, qmax = qrange(bits)
    # Division (not multiplication by 1/scale) to match QuantizeLinear; torch.round is half-to-even.
    return torch.clamp(torch.round(x / scale), qmin, qmax)


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """q * scale (ONNX DequantizeLinear with zero point 0)."""
    return q * scale


class _FakeQuantLSQ(torch.autograd.Function):
    """Fake quantization with the straight-through estimator for x and the LSQ gradient for scale."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, qmin: int, qmax: int, grad_factor: float) -> Tensor:
        v = x / scale
        q = torch.clamp(torch.round(v), qmin, qmax)
        ctx.save_for_backward(v, q, scale)
        ctx.grad_factor = grad_factor
        ctx.qrange = (qmin, qmax)
        return q * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        v, q, scale = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        inside = (v >= qmin) & (v <= qmax)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            # LSQ (Esser et al. 2020, Eq. 3): d(q*s)/ds = round(v) - v inside, the clamp bound outside.
            local = torch.where(inside, q - v, q)
            grad_s = (grad * local * ctx.grad_factor).sum_to_size(scale.shape)
        return grad_x, grad_s, None, None, None


def lsq_grad_factor(numel: int, bits: int) -> float:
    """LSQ's gradient scale 1 / sqrt(numel * qmax)."""
    return 1.0 / math.sqrt(max(numel, 1) * qrange(bits)[1])


_BATCH_SHARE = [1.0]


@contextlib.contextmanager
def batch_share(share: float) -> Iterator[None]:
    """Data-parallel training (saq_deploy.utils.distributed): this rank sees ``share`` of the global
    batch. LSQ's 1/sqrt(numel) of an activation step must count the global batch's elements, or each
    rank's step gradient is 1/sqrt(share) too large and the all-reduced gradient is not the
    one-process one (measured: 41 % off at share 1/2)."""
    old = _BATCH_SHARE[0]
    _BATCH_SHARE[0] = float(share)
    try:
        yield
    finally:
        _BATCH_SHARE[0] = old


def act_grad_factor(x: Tensor, bits: int) -> float | None:
    """The LSQ factor of an activation ``x`` under :func:`batch_share`; None (the default) otherwise."""
    share = _BATCH_SHARE[0]
    return None if share == 1.0 else lsq_grad_factor(round(x.numel() / share), bits)


def fake_quant(x: Tensor, scale: Tensor, bits: int, grad_factor: float | None = None) -> Tensor:
    """dequantize(quantize(x)) with STE for x and LSQ gradient for `scale`.

    `grad_factor` defaults to LSQ's 1/sqrt(x.numel() * qmax). Without autograd the plain ops run
    (same values bit for bit, and traceable).
    """
    qmin, qmax = qrange(bits)
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            return torch.clamp(torch.round(x / scale), qmin, qmax) * scale
        # same ops in the same order, in place on one buffer: ~2x faster sampling on CPU, where
        # four full-size temporaries per layer dominated the fake-quant cost
        q = torch.div(x, scale)
        return q.round_().clamp_(qmin, qmax).mul_(scale)
    if grad_factor is None:
        grad_factor = lsq_grad_factor(x.numel(), bits)
    return _FakeQuantLSQ.apply(x, scale, qmin, qmax, grad_factor)


def _positive(amax: Tensor) -> Tensor:
    # An all-zero channel has no natural scale; any positive one works (all codes are 0) and
    # TensorRT requires scales > 0.
    return torch.where(amax > 0, amax, torch.ones_like(amax))


def _check_method(method: str) -> None:
    if method not in SCALE_METHODS:
        raise ConfigError(f"scale method must be one of {SCALE_METHODS}, got {method!r}")


def _grouped_scale(groups: Tensor, bits: int, method: str) -> Tensor:
    """Scale per row of `groups` (R, N): minmax, or the authors' 80-candidate L2.4 search."""
    _check_method(method)
    qmax = qrange(bits)[1]
    amax = groups.abs().amax(dim=1)
    base = _positive(amax) / qmax
    if method == "minmax":
        return base
    best_scale = base.clone()
    best_err = torch.full_like(base, float("inf"))
    for i in range(MSE_CANDIDATES):
        cand = base * (1.0 - 0.01 * i)
        err = (fake_quant(groups, cand[:, None], bits) - groups).abs().pow(MSE_NORM).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, cand, best_scale)
    return best_scale


@torch.no_grad()
def per_channel_scale(w: Tensor, bits: int, method: ScaleMethod = "minmax") -> Tensor:
    """One scale per output channel (axis 0), shaped to broadcast: (out, 1, 1, 1) or (out, 1)."""
    out = w.shape[0]
    scale = _grouped_scale(w.detach().reshape(out, -1).float(), bits, method)
    return scale.reshape(out, *([1] * (w.dim() - 1)))


@torch.no_grad()
def per_block_scale(w: Tensor, bits: int, block_size: int, method: ScaleMethod = "minmax") -> Tensor:
    """Blocked scales for a Linear (out, in) or 1x1 conv (out, in, 1, 1) weight.

    Blocks of `block_size` run along the INPUT dim; returns (out, in // block_size).
    """
    if w.dim() not in (2, 4) or (w.dim() == 4 and tuple(w.shape[2:]) != (1, 1)):
        raise ConfigError(f"block scales need a 2-D or 1x1-conv weight, got shape {tuple(w.shape)}")
    out, inp = w.shape[0], w.shape[1]
    if block_size <= 0 or inp % block_size:
        raise ConfigError(f"block_size {block_size} does not divide the input dim {inp}")
    blocks = w.detach().reshape(out * inp // block_size, block_size).float()
    return _grouped_scale(blocks, bits, method).reshape(out, inp // block_size)


def expand_scale(scale: Tensor, weight_shape: torch.Size | tuple[int, ...], block_size: int | None) -> Tensor:
    """Broadcastable scale for a weight: blocked (out, in/bs) -> (out, in[, 1, 1]); else unchanged."""
    if block_size is None:
        return scale
    full = scale.repeat_interleave(block_size, dim=1)
    return full.reshape(full.shape[0], full.shape[1], *([1] * (len(weight_shape) - 2)))


def lp_error(x: Tensor, y: Tensor, p: float = MSE_NORM) -> Tensor:
    """Mean |x - y|^p (the authors' scale-search criterion)."""
    return (x - y).abs().pow(p).mean()
