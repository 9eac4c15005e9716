"""Tiny diffusers models saved as local folders, for loading and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_unet2d(num_class_embeds: int | None = 11):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=8, num_class_embeds=num_class_embeds)


def tiny_unet_cond():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=12,
                                attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def save_scheduler(folder: Path) -> None:
    from diffusers import DDPMScheduler

    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder)


def save_unet_folder(folder: Path, unet, *, meta: dict | None = None, scheduler: bool = True) -> Path:
    unet.save_pretrained(folder, safe_serialization=True)
    if scheduler:
        save_scheduler(folder)
    if meta is not None:
        (folder / "saq_model.json").write_text(json.dumps(meta))
    return folder


def save_pipeline_folder(root: Path, unet) -> Path:
    unet.save_pretrained(root / "unet", safe_serialization=True)
    save_scheduler(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}))
    return root


def minmax_artifact(out: Path, num_samples: int = 4, steps: int = 3, bits: str = "w8a8") -> Path:
    """A quick calibrated artifact of builtin:digits (minmax: no reconstruction)."""
    from saq_deploy.calibrate.recipe import Recipe
    from saq_deploy.calibrate.run import calibrate

    calibrate(Recipe().with_overrides({"calibration.method": "minmax", "quant.bits": bits,
                                       "calibration.num_samples": num_samples, "calibration.steps": steps}), out)
    return out


def tiny_unet_uncond(*, channels: int = 3, size: int = 8, widths: tuple[int, int] = (24, 48)):
    """An unconditional UNet2DModel (no class embedding) with odd widths (not multiples of 64, the
    INT4 block size) and attention in the second block, like the DDPM / LDM LSUN models in shape."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=widths, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       attention_head_dim=8)
