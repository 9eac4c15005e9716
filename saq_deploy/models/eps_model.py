"""The one model contract every backend satisfies (PyTorch FP32, fake-quant, ONNX Runtime, TensorRT).

``eps_model(x, timestep, cond)``:
- ``x``: (B, C, H, W) float tensor;
- ``timestep``: 1-D (B,) float tensor in the UNet's own discrete scale (0 ... num_train_timesteps-1);
  fractional values are allowed (DPM-Solver intermediate points);
- ``cond``: None (unconditional), a (B,) int64 tensor of class labels (class-conditional
  ``UNet2DModel``), or a (B, L, D) tensor of encoder hidden states (``UNet2DConditionModel``;
  an SDXL-class ``addition_embed_type="text_time"`` UNet: (B, L + k, D) with its pooled text
  embeds and time ids packed into k trailing rows, see :class:`AddedCond`);
- returns the predicted noise with ``x``'s shape and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class EpsModel(Protocol):
    def __call__(self, x: Tensor, timestep: Tensor, cond: Tensor | None = None, /) -> Tensor: ...


TIME_IDS = 6  # SDXL's micro-conditioning: original (H, W), crop top-left (y, x), target (H, W) in pixels


@dataclass(frozen=True)
class AddedCond:
    """Layout of SDXL-class added conditioning (``added_cond_kwargs``: ``text_embeds`` (B, E), the
    pooled text embedding, and ``time_ids`` (B, 6)) packed behind the text states as ``rows``
    trailing rows of width D: ``cond = [states; text_embeds ++ time_ids ++ zero padding]``.

    Packed because ``cond`` is then still one tensor that CFG concatenates, calibration's prompt
    table indexes, recorders clone and engines split by batch: every path carries it unchanged
    and only the places that call a UNet (here, the ONNX wrapper, the engine feeds) unpack it."""

    text_embeds: int  # E: projection_class_embeddings_input_dim - 6 * addition_time_embed_dim
    width: int  # D: cross_attention_dim

    @property
    def rows(self) -> int:
        return -(-(self.text_embeds + TIME_IDS) // self.width)

    @classmethod
    def of(cls, config) -> AddedCond | None:
        """The layout for a UNet config (dict-like); None unless ``addition_embed_type="text_time"``."""
        if config.get("addition_embed_type") != "text_time":
            return None
        dims = config["cross_attention_dim"]
        width = int(dims[0] if isinstance(dims, (list, tuple)) else dims)
        proj = int(config["projection_class_embeddings_input_dim"]) - TIME_IDS * int(config["addition_time_embed_dim"])
        return cls(text_embeds=proj, width=width)

    def pack(self, states: Tensor, text_embeds: Tensor, time_ids: Tensor) -> Tensor:
        flat = torch.cat([text_embeds.to(states), time_ids.to(states)], dim=-1)
        flat = torch.nn.functional.pad(flat, (0, self.rows * self.width - flat.shape[-1]))
        return torch.cat([states, flat.reshape(states.shape[0], self.rows, self.width)], dim=1)

    def unpack(self, cond: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(encoder states (B, L, D), ``added_cond_kwargs``) of a packed ``cond``."""
        extra = cond[:, -self.rows:].reshape(cond.shape[0], -1)
        e = self.text_embeds
        return cond[:, :-self.rows], {"text_embeds": extra[:, :e], "time_ids": extra[:, e:e + TIME_IDS]}


def default_time_ids(loaded) -> Tensor:
    """(1, 6) SDXL time ids as diffusers' SDXL pipeline computes them by default (``loaded``: a
    LoadedModel): original = target = the image size in pixels, i.e. the sample size times the
    VAE's factor (SDXL's 8 without a VAE), crop top-left (0, 0)."""
    _, h, w = loaded.sample_shape
    vae = getattr(loaded, "vae", None)
    f = 8 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
    return torch.tensor([[h * f, w * f, 0, 0, h * f, w * f]], dtype=torch.float32)


def text_kwargs(cond: Tensor, added: AddedCond | None) -> dict:
    """Keyword inputs of a cross-attention UNet call for a (packed, with ``added``) ``cond``."""
    if added is None:
        return {"encoder_hidden_states": cond}
    states, extra = added.unpack(cond)
    return {"encoder_hidden_states": states, "added_cond_kwargs": extra}


class TorchEpsModel:
    """Adapts a diffusers UNet (``UNet2DModel`` or ``UNet2DConditionModel``) to the EpsModel contract."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        # UNet2DConditionModel takes encoder states; UNet2DModel takes optional class labels
        config = getattr(unet, "config", {})
        self._cross_attention = config.get("cross_attention_dim") is not None
        self._added = AddedCond.of(config) if self._cross_attention else None

    @torch.no_grad()
    def __call__(self, x: Tensor, timestep: Tensor, cond: Tensor | None = None, /) -> Tensor:
        param = next(self.unet.parameters())
        t = timestep.to(device=param.device, dtype=param.dtype).reshape(-1)
        if t.numel() == 1 and x.shape[0] > 1:
            t = t.expand(x.shape[0])
        xin = x.to(device=param.device, dtype=param.dtype)
        if self._cross_attention:
            out = self.unet(xin, t, **text_kwargs(cond.to(xin), self._added), return_dict=False)[0]
        else:
            labels = None if cond is None else cond.to(device=param.device, dtype=torch.long)
            out = self.unet(xin, t, class_labels=labels, return_dict=False)[0]
        return out.to(dtype=x.dtype, device=x.device)


def cond_kwargs(cond: Tensor | None, table: Tensor | None = None, unet=None) -> dict:
    """Keyword inputs of a direct UNet call for an integer ``cond``: class labels, or (``table``: a
    cross-attention UNet's embedding rows, e.g. calibration's prompts) ``encoder_hidden_states``
    and, when ``unet`` is SDXL-class, its ``added_cond_kwargs`` from the rows' packed tail."""
    if table is None:
        return {"class_labels": cond}
    return text_kwargs(table[cond.long()], None if unet is None else AddedCond.of(unet.config))


class IndexedCondEpsModel:
    """EpsModel taking integer cond indices into a table of encoder hidden states (P [+1], L, D):
    calibration keeps prompt indices in its records and CFG's null as one more row."""

    def __init__(self, inner: EpsModel, table: Tensor) -> None:
        self.inner = inner
        self.table = table

    def __call__(self, x: Tensor, timestep: Tensor, cond: Tensor | None = None, /) -> Tensor:
        return self.inner(x, timestep, None if cond is None else self.table[cond.long()])
