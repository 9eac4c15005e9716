"""What diffusers schedulers do to the data prediction x0 before they step: ``clip_sample``
(clamp to ±``clip_sample_range``) and ``thresholding`` (Imagen's dynamic thresholding: clamp each
sample to its ``dynamic_thresholding_ratio`` quantile of |x0|, at least 1 and at most
``sample_max_value``, and divide by it).

Read from the model's scheduler config (:meth:`X0Policy.from_config`), so a model whose config asks
for clipping is sampled as a diffusers pipeline would sample it. Which schedulers honour which key
is theirs, not ours: ``DDIMScheduler`` (and DDPM) applies thresholding, else ``clip_sample``; the
DPM-Solver, DPM-Solver++ and UniPC schedulers apply only ``thresholding``; PNDM neither. Each
sampler therefore asks for ``clip=True`` or not (see ``saq_deploy.samplers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saq_deploy.errors import ConfigError


@dataclass(frozen=True)
class X0Policy:
    clip_range: float | None = None  # clip_sample: x0.clamp(-r, r)
    threshold_ratio: float | None = None  # thresholding: the |x0| quantile per sample
    sample_max_value: float = 1.0

    def __post_init__(self) -> None:
        if self.clip_range is not None and not self.clip_range > 0:
            raise ConfigError(f"clip_sample_range must be > 0, got {self.clip_range}")
        if self.threshold_ratio is not None and not 0.0 < self.threshold_ratio <= 1.0:
            raise ConfigError(f"dynamic_thresholding_ratio must be in (0, 1], got {self.threshold_ratio}")
        if not self.sample_max_value >= 1.0:
            raise ConfigError(f"sample_max_value must be >= 1, got {self.sample_max_value}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> X0Policy | None:
        """The policy a diffusers scheduler config asks for; None when it asks for neither."""
        clip = bool(config.get("clip_sample", False))
        threshold = bool(config.get("thresholding", False))
        if not (clip or threshold):
            return None
        return cls(clip_range=float(config.get("clip_sample_range", 1.0)) if clip else None,
                   threshold_ratio=float(config.get("dynamic_thresholding_ratio", 0.995)) if threshold else None,
                   sample_max_value=float(config.get("sample_max_value", 1.0)))

    def to_dict(self) -> dict[str, Any]:
        return {"clip_range": self.clip_range, "threshold_ratio": self.threshold_ratio,
                "sample_max_value": self.sample_max_value}

    def applies(self, *, clip: bool) -> bool:
        return self.threshold_ratio is not None or (clip and self.clip_range is not None)

    def apply(self, x0: Tensor, *, clip: bool) -> Tensor:
        """Thresholding when asked for (it wins over clipping, as in diffusers); else clipping
        when the sampler's diffusers counterpart clips (``clip``); else x0 unchanged."""
        if self.threshold_ratio is not None:
            return self._threshold(x0)
        if clip and self.clip_range is not None:
            return x0.clamp(-self.clip_range, self.clip_range)
        return x0

    def _threshold(self, x0: Tensor) -> Tensor:
        # diffusers' _threshold_sample: quantile needs float32/64; per sample over all its elements
        flat = x0.reshape(x0.shape[0], -1)
        work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        s = torch.quantile(work.abs(), self.threshold_ratio, dim=1)
        s = s.clamp(min=1.0, max=self.sample_max_value).unsqueeze(1)
        return (work.clamp(-s, s) / s).to(x0.dtype).reshape(x0.shape)
