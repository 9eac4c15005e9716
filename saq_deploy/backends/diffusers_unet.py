"""An engine as a drop-in ``unet`` for diffusers pipelines and scheduler loops.

``EngineUNet`` has the UNet's call signature (``sample, timestep, encoder_hidden_states=None,
class_labels=None, return_dict=True``, SDXL's ``added_cond_kwargs``) and output type (``UNet2DOutput``), a ``config`` with the
exported UNet's configuration, and ``dtype`` / ``device``, which is what pipelines touch.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from saq_deploy.errors import ConfigError


class _Config(dict):
    """diffusers configs are dicts with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


class EngineUNet(torch.nn.Module):
    def __init__(self, engine) -> None:
        super().__init__()
        self.engine = engine
        self.eps = engine.eps_model()
        self.config = _Config(engine.meta.get("unet_config", {}))
        self._dummy = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # dtype/device for pipelines

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states=None, class_labels=None,
                return_dict: bool = True, added_cond_kwargs=None, **unused):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        t = t.expand(sample.shape[0]) if t.numel() == 1 else t
        kind = self.engine.kind
        if kind == "text":
            cond = encoder_hidden_states
            if self.eps.added is not None:  # SDXL pipelines pass text_embeds / time_ids here
                if not added_cond_kwargs:
                    raise ConfigError("this engine is SDXL-class: pass added_cond_kwargs with text_embeds and time_ids")
                cond = self.eps.added.pack(cond, added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"])
        elif kind == "class":
            if class_labels is None:
                raise ConfigError("this engine is class-conditional: pass class_labels")
            cond = torch.as_tensor(class_labels).reshape(-1).expand(sample.shape[0])
        else:
            cond = None
        out = self.eps(sample, t, cond)
        if not return_dict:
            return (out,)
        try:
            from diffusers.models.unets.unet_2d import UNet2DOutput
        except ImportError:  # older diffusers layout
            return SimpleNamespace(sample=out)
        return UNet2DOutput(sample=out)
