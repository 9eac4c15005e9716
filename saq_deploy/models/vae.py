"""The VAE of a latent-diffusion pipeline folder (``vae/`` beside ``unet/``): latents -> images.

Decoding follows the diffusers pipelines: ``vae.decode(latents / scaling_factor + shift_factor)``
(``shift_factor`` only where the config has one, e.g. SD3), output in [-1, 1] (not clamped here:
grids clamp, metrics see what the VAE produced). Weights load with the same checks as the UNet's
(safetensors header, no pickled code, every key present); nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from saq_deploy.errors import ModelLoadError

VAE_CLASSES = ("AutoencoderKL",)


def find_vae_dir(pipeline_root: Path) -> Path | None:
    """``<root>/vae`` when it holds a supported VAE config, else None (a folder without a VAE)."""
    cfg = pipeline_root / "vae" / "config.json"
    if not cfg.exists():
        return None
    try:
        cls = json.loads(cfg.read_text()).get("_class_name")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"'{cfg}' is not a readable JSON config ({e})") from e
    if cls not in VAE_CLASSES:
        raise ModelLoadError(f"'{cfg.parent}' holds a {cls or 'non-diffusers'} model; supported VAEs: "
                             + ", ".join(VAE_CLASSES))
    return cfg.parent


def load_vae(vae_dir: Path):
    """The AutoencoderKL in ``vae_dir``, eval mode, float32 (ModelLoadError on a broken folder)."""
    from saq_deploy.models.loading import load_diffusers_model

    return load_diffusers_model(vae_dir, VAE_CLASSES, "the VAE")


class VaeDecoder:
    """``decoder(latents) -> images``, batched so memory stays bounded."""

    def __init__(self, vae, batch_size: int = 16) -> None:
        self.vae = vae
        self.scaling_factor = float(vae.config.get("scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(vae.config.get("shift_factor", 0.0) or 0.0)
        self.batch_size = batch_size

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.shape[1] != self.latent_channels:
            raise ModelLoadError(f"the VAE decodes {self.latent_channels}-channel latents, the UNet makes "
                                 f"{latents.shape[1]} channels: this vae/ does not belong to this unet/")
        param = next(self.vae.parameters())
        outs = []
        for chunk in latents.split(self.batch_size):
            z = chunk.to(device=param.device, dtype=param.dtype) / self.scaling_factor + self.shift_factor
            outs.append(self.vae.decode(z, return_dict=False)[0].float().cpu())
        return torch.cat(outs)
