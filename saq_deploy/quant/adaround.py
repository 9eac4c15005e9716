"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Each weight rounds down (floor) or up, decided by a learnable `alpha` through the rectified
sigmoid h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1). `scale` here must
broadcast against the weight (expand blocked scales first).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from saq_deploy.quant.quantizer import qrange

ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(alpha: Tensor) -> Tensor:
    """h(alpha) in [0, 1] (Eq. 23); reaches 0 and 1 exactly, so rounding can become hard."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


@torch.no_grad()
def init_alpha(w: Tensor, scale: Tensor) -> Tensor:
    """alpha with h(alpha) = frac(w / scale): the soft weight starts at the unrounded weight."""
    v = w / scale
    rest = v - torch.floor(v)
    # Inverse of h on (gamma, zeta); rest in [0, 1) stays strictly inside that interval.
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def soft_quantize(w: Tensor, scale: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """scale * clamp(floor(w/scale) + h(alpha), qmin, qmax): differentiable in alpha."""
    qmin, qmax = qrange(bits)
    base = torch.floor(w / scale).detach()  # the floor is fixed; only the rounding direction learns
    return torch.clamp(base + rectified_sigmoid(alpha), qmin, qmax) * scale


@torch.no_grad()
def hard_int(w: Tensor, scale: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """The decided integer codes: floor(w/scale) + (alpha >= 0), clamped (h >= 0.5 iff alpha >= 0)."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.floor(w / scale) + (alpha >= 0).to(w.dtype), qmin, qmax)


def round_regularizer(alpha: Tensor, beta: float) -> Tensor:
    """sum(1 - |2h - 1|^beta): 0 when every h is 0 or 1, largest at h = 0.5."""
    h = rectified_sigmoid(alpha)
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


class BetaStep(NamedTuple):
    """beta for the regulariser and its weight factor (0 during warm-up, else 1)."""

    beta: float
    weight: float


def beta_schedule(iteration: int, total: int, start: float = 20.0, end: float = 2.0,
                  warmup: float = 0.2) -> BetaStep:
    """BRECQ's LinearTempDecay: (start, weight 0) during warm-up (iteration < warmup * total, no
    regularisation), then beta falls linearly from `start` to `end` at `total` with weight 1.

        beta, weight = beta_schedule(it, iters)
        loss = rec + lam * weight * round_regularizer(alpha, beta)
    """
    if total <= 0:
        raise ValueError(f"total iterations must be > 0, got {total}")
    warm = warmup * total
    if iteration < warm:
        return BetaStep(float(start), 0.0)
    rel = (iteration - warm) / max(total - warm, 1e-12)
    return BetaStep(end + (start - end) * max(0.0, 1.0 - rel), 1.0)
