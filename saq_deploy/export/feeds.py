"""UNet inputs recorded along real sampling trajectories: what export-time observers and the
parity gate feed to the graphs, so both see the (x, t, cond) the deployed engine will see."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Call:
    """One UNet evaluation: inputs (CFG-batched as the engine sees them), the sampler and step."""

    x: torch.Tensor
    t: torch.Tensor  # (B,)
    cond: torch.Tensor | None
    sampler: str
    step: int

    def feed(self, cond_name: str | None, added=None) -> dict[str, np.ndarray]:
        """Graph inputs by name; ``added`` (an SDXL-class UNet's ``AddedCond``) splits the packed
        cond into ``encoder_hidden_states``, ``text_embeds`` and ``time_ids``."""
        f = {"sample": self.x.numpy().astype(np.float32), "timestep": self.t.numpy().astype(np.float32)}
        if cond_name == "class_labels":
            f[cond_name] = self.cond.numpy().astype(np.int64)
        elif cond_name == "encoder_hidden_states":
            from saq_deploy.models.eps_model import text_kwargs

            kw = text_kwargs(self.cond, added)
            for name, v in {cond_name: kw[cond_name], **kw.get("added_cond_kwargs", {})}.items():
                f[name] = np.ascontiguousarray(v.numpy(), dtype=np.float32)
        return f


class RecordingEpsModel:
    """Wraps an EpsModel and keeps a copy of every call's inputs."""

    def __init__(self, inner, sampler: str = "") -> None:
        self.inner = inner
        self.sampler = sampler
        self.calls: list[Call] = []

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None = None, /) -> torch.Tensor:
        t = timestep.reshape(-1).float()
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        self.calls.append(Call(x.detach().clone(), t.clone(), None if cond is None else cond.detach().clone(),
                               self.sampler, len(self.calls)))
        return self.inner(x, timestep, cond)


def record_calls(eps_model, model_info, *, samplers: tuple[str, ...] = ("ddim", "dpmpp-2m"), steps: int = 10,
                 n: int = 8, cfg: float = 1.5, seed: int = 0, cond: torch.Tensor | None = None,
                 null_cond: torch.Tensor | None = None) -> list[Call]:
    """Run each sampler for ``n`` seeded samples and return every UNet call's inputs.

    ``model_info``: anything with ``schedule()``, ``sample_shape``, ``num_classes``, ``null_label``
    (a LoadedModel or an engine). A text UNet: ``cond`` (n, L, D) and, for guidance, ``null_cond``
    (1, L, D) the negative prompt's embedding (``CalibratedModel.prompt_cond``)."""
    from saq_deploy.generate import SampleSettings, generate

    calls: list[Call] = []
    for sampler in samplers:
        rec = RecordingEpsModel(eps_model, sampler)
        null = model_info.null_label if null_cond is None else null_cond
        settings = SampleSettings(sampler=sampler, steps=steps, cfg=cfg if null is not None else 1.0,
                                  seed=seed, n=n, batch_size=n)
        generate(rec, model_info.schedule(), model_info.sample_shape, settings,
                 num_classes=model_info.num_classes, null_label=null, cond=cond)
        calls.extend(rec.calls)
    return calls
