"""Train the built-in class-conditional DDPM (`builtin:digits`) on scikit-learn's digits.

Reproducible from the seed on CPU (deterministic algorithms, one data-order generator). The EMA
weights are saved as a standard diffusers folder (config.json + safetensors + scheduler config)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from saq_deploy.reference import NULL_LABEL, NUM_CLASSES
from saq_deploy.reference.data import IMAGE_SIZE, load_digits_16
from saq_deploy.reference.training import (
    deterministic_algorithms,
    ema_update,
    environment_fields,
    loss_fields,
    noised,
    optimizer_step,
    recent_loss,
    run_from_argv,
    warmup_cosine_lr,
)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # labels replaced by NULL_LABEL so classifier-free guidance works
    seed: int = 0
    num_train_timesteps: int = 1000


def build_unet():
    """1.71 M-parameter UNet2DModel; attention in the two lower down blocks and two upper up blocks,
    so attention projections exist to quantize."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=NUM_CLASSES + 1,
        norm_num_groups=8,
        attention_head_dim=32,
    )


def build_scheduler(num_train_timesteps: int = 1000):
    from diffusers import DDPMScheduler

    # clip_sample off: every committed figure of this model was sampled without x0 clipping, and
    # the samplers follow the config (saq_deploy.schedules.x0); benchmarks/testbed.py measures it on
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule="linear", prediction_type="epsilon",
        clip_sample=False,
    )


def train_reference(out_dir: Path, config: TrainConfig = TrainConfig(), *, progress: bool = True) -> dict:
    """Train and write a diffusers UNet folder to ``out_dir`` (atomically). Returns the training log."""
    with deterministic_algorithms():
        return _train(Path(out_dir), config, progress)


def _train(out_dir: Path, config: TrainConfig, progress: bool) -> dict:
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    images, labels = load_digits_16(split="all")
    unet = build_unet()
    ema = build_unet()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    sched = build_scheduler(config.num_train_timesteps)
    acp = sched.alphas_cumprod.float()
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

    losses: list[float] = []
    t0 = time.perf_counter()
    from saq_deploy.utils.progress import progress as progress_for

    with progress_for(progress, "train-reference") as bar:
        task = bar.task("train", total=config.steps)
        for step in range(config.steps):
            idx = torch.randint(0, len(images), (config.batch_size,), generator=gen)
            x0, y = images[idx], labels[idx].clone()
            drop = torch.rand(config.batch_size, generator=gen) < config.label_dropout
            y[drop] = NULL_LABEL
            xt, t, noise = noised(x0, acp, config.num_train_timesteps, gen)
            loss = torch.nn.functional.mse_loss(unet(xt, t, class_labels=y).sample, noise)
            optimizer_step(opt, loss, params,
                           warmup_cosine_lr(step, lr=config.lr, warmup=config.warmup, steps=config.steps))
            ema_update([(ema, unet)], step, config.ema_decay)
            losses.append(loss.item())
            if step % 50 == 0 or step == config.steps - 1:
                task.update(completed=step + 1, description=f"train loss {recent_loss(losses):.4f}")
    wall = time.perf_counter() - t0
    log = {
        "config": asdict(config),
        "parameters": sum(p.numel() for p in unet.parameters()),
        **loss_fields(losses),
        "wall_time_s": wall,
        **environment_fields(),
    }
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent if out_dir.parent.exists() else None))
    ema.save_pretrained(tmp, safe_serialization=True)
    sched.save_pretrained(tmp)  # scheduler_config.json beside the UNet, as in a pipeline's unet folder
    (tmp / "training_log.json").write_text(json.dumps(log, indent=2))
    meta = {"num_classes": NUM_CLASSES, "null_label": NULL_LABEL, "image_range": [-1, 1],
            "description": "builtin:digits reference model; see docs/reference-model.md"}
    (tmp / "saq_model.json").write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return log


if __name__ == "__main__":
    from saq_deploy.reference import DIGITS_UNET_DIR

    run_from_argv(train_reference, TrainConfig, DIGITS_UNET_DIR)
