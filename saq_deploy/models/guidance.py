"""Classifier-free guidance (Ho & Salimans 2022) as an EpsModel wrapper.

``eps = eps(x, t, null) + scale * (eps(x, t, cond) - eps(x, t, null))``, with the unconditional
and conditional halves evaluated in ONE model call on the batch ``[uncond; cond]`` (what the
calibration, ONNX and TensorRT paths see, and half the launches of two calls).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saq_deploy.models.eps_model import EpsModel


class ClassifierFreeGuidance:
    """EpsModel wrapper applying classifier-free guidance.

    ``null_cond``: the "no condition" input -- a scalar class label (e.g. 10 for a 10-class model
    trained with an extra null label), or a tensor of encoder states of shape (L, D), (1, L, D) or
    (B, L, D) for cross-attention models. Calls with ``cond=None`` pass straight through.
    """

    def __init__(self, model: EpsModel, scale: float, null_cond: int | Tensor) -> None:
        self.model = model
        self.scale = float(scale)
        self.null_cond = null_cond

    def _null_like(self, cond: Tensor) -> Tensor:
        null = self.null_cond
        if not isinstance(null, Tensor) or null.ndim == 0:
            return torch.full_like(cond, int(null) if cond.dtype == torch.int64 else float(null))
        null = null.to(device=cond.device, dtype=cond.dtype)
        if null.ndim == cond.ndim - 1:
            null = null.unsqueeze(0)
        return null.expand_as(cond)

    def __call__(self, x: Tensor, timestep: Tensor, cond: Tensor | None = None, /) -> Tensor:
        if cond is None:
            return self.model(x, timestep, None)
        b = x.shape[0]
        t = timestep.reshape(-1)
        if t.numel() == 1 and b > 1:
            t = t.expand(b)
        eps = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self._null_like(cond), cond]))
        eps_u, eps_c = eps[:b], eps[b:]
        return eps_u + self.scale * (eps_c - eps_u)
