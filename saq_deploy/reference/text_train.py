"""Train the built-in text-to-image pipeline (`builtin:digits-text`) on scikit-learn's digits.

An SD-1.x-shaped pipeline, scaled down: a ``UNet2DConditionModel`` built from SD-1.x block types
(``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D`` / ``UNetMidBlock2DCrossAttn``; transformer blocks
with self-attention, cross-attention and feed-forward), a transformers ``CLIPTextModel`` and a
``CLIPTokenizer`` over the vocabulary of ``reference.text_data``, a DDPM scheduler; pixel space
(1x16x16, no VAE). Unlike SD, the text encoder has no pretrained weights to freeze: it is trained
jointly with the UNet on the diffusion loss. Prompts name the digit and, 75 % of the time, its
stroke weight; 10 % are replaced by the empty prompt so classifier-free guidance has its
unconditional branch (diffusers' default negative prompt is the empty prompt).

Reproducible from the seed on CPU (deterministic algorithms, one data-order generator). Written as
a diffusers pipeline folder (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from saq_deploy.reference.data import IMAGE_SIZE, load_digits_16
from saq_deploy.reference.text_data import (
    MAX_LENGTH,
    all_prompts,
    attribute_of,
    eval_prompts,
    ink_thresholds,
    prompt_choices,
    tokenize,
    write_tokenizer,
)
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

TEXT_WIDTH = 64  # text encoder hidden size = the UNet's cross_attention_dim


@dataclass(frozen=True)
class TextTrainConfig:
    steps: int = 2500
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1  # prompt replaced by "" for classifier-free guidance
    plain_fraction: float = 0.25  # prompts that name only the digit
    seed: int = 0
    num_train_timesteps: int = 1000


def build_unet():
    """SD-1.x block types at 16x16: cross-attention at 8x8, 4x4 and in the mid block."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=2,  # diffusers' UNet2DConditionModel reads this as the number of heads
        norm_num_groups=8,
    )


def build_text_encoder(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                         projection_dim=TEXT_WIDTH, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return CLIPTextModel(cfg)


def build_scheduler(num_train_timesteps: int = 1000):
    from diffusers import DDPMScheduler

    # clip_sample off, as for builtin:digits: the committed figures were sampled without x0 clipping
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                         prediction_type="epsilon", clip_sample=False)


def train_text_reference(out_dir: Path, config: TextTrainConfig = TextTrainConfig(), *,
                         progress: bool = True) -> dict:
    """Train and write the pipeline folder to ``out_dir`` (atomically). Returns the training log."""
    with deterministic_algorithms():
        return _train(Path(out_dir), config, progress)


def _prompt_sampler(images, labels, thresholds, config, gen):
    """Per image: the prompt indices it may get (attribute prompts, plain prompts)."""
    attrs = attribute_of(images, labels, thresholds)
    choice_cache = {(d, a): tuple(torch.tensor(c) for c in prompt_choices(d, a)) for d in range(10) for a in (0, 1)}
    empty_index = len(all_prompts())  # one more row: the empty prompt

    def draw(idx: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(idx), dtype=torch.long)
        r = torch.rand(len(idx), generator=gen)
        pick = torch.randint(0, 1 << 30, (len(idx),), generator=gen)
        for k, i in enumerate(idx.tolist()):
            with_attr, without = choice_cache[(int(labels[i]), int(attrs[i]))]
            if r[k] < config.prompt_dropout:
                out[k] = empty_index
            elif r[k] < config.prompt_dropout + config.plain_fraction:
                out[k] = without[pick[k] % len(without)]
            else:
                out[k] = with_attr[pick[k] % len(with_attr)]
        return out

    return draw, attrs


def _train(out_dir: Path, config: TextTrainConfig, progress: bool) -> dict:
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    images, labels = load_digits_16(split="all")
    thresholds = ink_thresholds(images, labels)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))  # same file system: rename is atomic
    try:
        tokenizer = write_tokenizer(tmp / "tokenizer")
        ids = tokenize(tokenizer, [*all_prompts(), ""])  # every prompt once; row -1 is the empty prompt
        vocab = tokenizer.get_vocab()
        bos, eos = vocab[tokenizer.bos_token], vocab[tokenizer.eos_token]
        unet, text = build_unet(), build_text_encoder(len(vocab), bos, eos)
        ema_unet, ema_text = build_unet(), build_text_encoder(len(vocab), bos, eos)
        ema_unet.load_state_dict(unet.state_dict())
        ema_text.load_state_dict(text.state_dict())
        ema_unet.requires_grad_(False)
        ema_text.requires_grad_(False)
        log = _loop(unet, text, ema_unet, ema_text, ids, images, labels, thresholds, config, gen, progress)
        ema_unet.save_pretrained(tmp / "unet", safe_serialization=True)
        ema_text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        build_scheduler(config.num_train_timesteps).save_pretrained(tmp / "scheduler")
        _write_pipeline_files(tmp, thresholds, log)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return log


def _loop(unet, text, ema_unet, ema_text, ids, images, labels, thresholds, config, gen, progress) -> dict:
    from saq_deploy.utils.progress import progress as progress_for

    sched = build_scheduler(config.num_train_timesteps)
    acp = sched.alphas_cumprod.float()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    draw, _ = _prompt_sampler(images, labels, thresholds, config, gen)

    losses: list[float] = []
    t0 = time.perf_counter()
    with progress_for(progress, "train-text-reference") as bar:
        task = bar.task("train", total=config.steps)
        for step in range(config.steps):
            idx = torch.randint(0, len(images), (config.batch_size,), generator=gen)
            x0, prompt_rows = images[idx], draw(idx)
            xt, t, noise = noised(x0, acp, config.num_train_timesteps, gen)
            states = text(ids[prompt_rows]).last_hidden_state
            loss = torch.nn.functional.mse_loss(unet(xt, t, encoder_hidden_states=states).sample, noise)
            optimizer_step(opt, loss, params,
                           warmup_cosine_lr(step, lr=config.lr, warmup=config.warmup, steps=config.steps))
            ema_update([(ema_unet, unet), (ema_text, text)], step, config.ema_decay)
            losses.append(loss.item())
            if step % 50 == 0 or step == config.steps - 1:
                task.update(completed=step + 1, description=f"train loss {recent_loss(losses):.4f}")
    return {
        "config": asdict(config),
        "parameters": {"unet": sum(p.numel() for p in unet.parameters()),
                       "text_encoder": sum(p.numel() for p in text.parameters())},
        **loss_fields(losses),
        "wall_time_s": time.perf_counter() - t0,
        **environment_fields(),
    }


def _write_pipeline_files(root: Path, thresholds: list[float], log: dict) -> None:
    import diffusers
    import transformers

    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "vae": [None, None], "safety_checker": [None, None], "feature_extractor": [None, None],
        "image_encoder": [None, None], "requires_safety_checker": False,
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    meta = {"image_range": [-1, 1], "ink_thresholds": thresholds, "attributes": ["thin", "bold"],
            # what `sample` uses without --prompt: one grid column per prompt
            "default_prompts": eval_prompts(20)[0],
            "transformers": transformers.__version__,
            "description": "builtin:digits-text reference pipeline; see docs/reference-text-model.md"}
    (root / "unet" / "saq_model.json").write_text(json.dumps(meta, indent=2))
    (root / "training_log.json").write_text(json.dumps(log, indent=2))


if __name__ == "__main__":
    from saq_deploy.reference import DIGITS_TEXT_DIR

    run_from_argv(train_text_reference, TextTrainConfig, DIGITS_TEXT_DIR)
