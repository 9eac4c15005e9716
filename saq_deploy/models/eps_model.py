"""The one model contract every backend satisfies (PyTorch FP32, fake-quant, ONNX Runtime, TensorRT).

``eps_model(x, timestep, cond)``:
- ``x``: (B, C, H, W) float tensor;
- ``timestep``: 1-D (B,) float tensor in the UNet's own discrete scale (0 ... num_train_timesteps-1);
  fractional values are allowed (DPM-Solver intermediate points);
- ``cond``: None (unconditional), a (B,) int64 tensor of class labels (class-conditional
  ``UNet2DModel``), or a (B, L, D) tensor of encoder hidden states (``UNet2DConditionModel``);
- returns the predicted noise with ``x``'s shape and dtype.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class EpsModel(Protocol):
    def __call__(self, x: Tensor, timestep: Tensor, cond: Tensor | None = None, /) -> Tensor: ...


class TorchEpsModel:
    """Adapts a diffusers UNet (``UNet2DModel`` or ``UNet2DConditionModel``) to the EpsModel contract."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        # UNet2DConditionModel takes encoder states; UNet2DModel takes optional class labels
        self._cross_attention = getattr(unet, "config", {}).get("cross_attention_dim") is not None

    @torch.no_grad()
    def __call__(self, x: Tensor, timestep: Tensor, cond: Tensor | None = None, /) -> Tensor:
        param = next(self.unet.parameters())
        t = timestep.to(device=param.device, dtype=param.dtype).reshape(-1)
        if t.numel() == 1 and x.shape[0] > 1:
            t = t.expand(x.shape[0])
        xin = x.to(device=param.device, dtype=param.dtype)
        if self._cross_attention:
            out = self.unet(xin, t, encoder_hidden_states=cond.to(xin), return_dict=False)[0]
        else:
            labels = None if cond is None else cond.to(device=param.device, dtype=torch.long)
            out = self.unet(xin, t, class_labels=labels, return_dict=False)[0]
        return out.to(dtype=x.dtype, device=x.device)


def cond_kwargs(cond: Tensor | None, table: Tensor | None = None) -> dict:
    """Keyword inputs of a direct UNet call for an integer ``cond``: class labels, or (``table``: a
    cross-attention UNet's embedding rows, e.g. calibration's prompts) ``encoder_hidden_states``."""
    if table is None:
        return {"class_labels": cond}
    return {"encoder_hidden_states": table[cond.long()]}


class IndexedCondEpsModel:
    """EpsModel taking integer cond indices into a table of encoder hidden states (P [+1], L, D):
    calibration keeps prompt indices in its records and CFG's null as one more row."""

    def __init__(self, inner: EpsModel, table: Tensor) -> None:
        self.inner = inner
        self.table = table

    def __call__(self, x: Tensor, timestep: Tensor, cond: Tensor | None = None, /) -> Tensor:
        return self.inner(x, timestep, None if cond is None else self.table[cond.long()])
