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


TEXT_MAX_LEN = 8  # tokens of tiny_text_pipeline's tokenizer


def tiny_tokenizer(folder: Path) -> int:
    """A character-level CLIP BPE tokenizer with TEXT_MAX_LEN tokens saved to ``folder``; its vocab size."""
    from transformers import CLIPTokenizer

    src = folder.parent.parent / f"{folder.parent.name}-{folder.name}-vocab"  # outside the pipeline folder
    src.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"),
                  model_max_length=TEXT_MAX_LEN).save_pretrained(folder)
    return len(vocab)


def tiny_clip_config(vocab: int, width: int, layers: int = 1, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                          num_attention_heads=2, max_position_embeddings=TEXT_MAX_LEN, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1, **kw)


def tiny_text_pipeline(root: Path, *, schedule: dict | None = None) -> Path:
    """An SD-1.x-layout pipeline folder (unet/ = tiny_unet_cond, text_encoder/ a 1-layer CLIP of width
    12, tokenizer/ a character-level CLIP BPE with TEXT_MAX_LEN tokens, scheduler/), random weights."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel

    vocab = tiny_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    CLIPTextModel(tiny_clip_config(vocab, 12)).save_pretrained(root / "text_encoder")
    tiny_unet_cond().save_pretrained(root / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, **(schedule or {})).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


SDXL_D, SDXL_E = 32, 16  # tiny_sdxl_unet's cross_attention_dim and pooled (text_embeds) width


def tiny_sdxl_unet():
    """An SDXL-config UNet2DConditionModel (addition_embed_type text_time), widths 32/64, 8x8 latents."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=1,
                                cross_attention_dim=SDXL_D, attention_head_dim=(2, 4), addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=SDXL_E + 6 * 8)


def tiny_sdxl_pipeline(root: Path, *, force_zeros: bool = True, unet=None) -> Path:
    """An SDXL-layout pipeline folder: unet/ (tiny_sdxl_unet), vae/ (tiny_vae, 2x), scheduler/,
    tokenizer/ + text_encoder/ (CLIPTextModel, width 12), tokenizer_2/ + text_encoder_2/
    (CLIPTextModelWithProjection, width 20, projection 16): 12 + 20 = the UNet's 32; 2 layers each,
    so the penultimate hidden state SDXL takes is not the embedding layer's."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    vocab = tiny_tokenizer(root / "tokenizer")
    tiny_tokenizer(root / "tokenizer_2")
    torch.manual_seed(0)
    CLIPTextModel(tiny_clip_config(vocab, 12, 2)).save_pretrained(root / "text_encoder")
    CLIPTextModelWithProjection(tiny_clip_config(vocab, SDXL_D - 12, 2, projection_dim=SDXL_E)).save_pretrained(
        root / "text_encoder_2")
    (unet or tiny_sdxl_unet()).save_pretrained(root / "unet", safe_serialization=True)
    tiny_vae().save_pretrained(root / "vae", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, **LDM_SCHEDULE).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                       "force_zeros_for_empty_prompt": force_zeros}))
    return root


def encode_text(root: Path, texts: list[str]):
    """Oracle: transformers' CLIP tokenizer + text encoder called directly, as diffusers' SD pipelines
    call them (pad to max length, truncate, last hidden state)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return CLIPTextModel.from_pretrained(root / "text_encoder")(ids).last_hidden_state


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


def save_pipeline_folder(root: Path, unet, *, vae=None, scheduler_kwargs: dict | None = None) -> Path:
    """A diffusers pipeline folder: model_index.json, unet/, scheduler/ and (``vae``) vae/."""
    from diffusers import DDPMScheduler

    unet.save_pretrained(root / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, **(scheduler_kwargs or {})).save_pretrained(root / "scheduler")
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}
    if vae is not None:
        vae.save_pretrained(root / "vae", safe_serialization=True)
        index = {"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"],
                 "vae": ["diffusers", "AutoencoderKL"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def tiny_vae(latent_channels: int = 4, scaling_factor: float = 0.5):
    """A small random-weight AutoencoderKL: 3-channel images, 2x downsampling (two blocks)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=4, sample_size=16,
                         scaling_factor=scaling_factor).eval()


# LDM / Stable Diffusion's schedule: terminal alpha_bar 0.0047, not linear 1e-4..0.02's 4e-5, whose
# x0 prediction at t=999 multiplies any eps error by 1/sqrt(4e-5) = 156 (a briefly trained model
# then samples values in the tens and the final-sample PSNR of the parity gate means nothing)
LDM_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def train_briefly(unet, steps: int = 150, *, batch: int = 32, lr: float = 3e-3, seed: int = 0,
                  cond_table: torch.Tensor | None = None):
    """Train a tiny UNet2DModel for ``steps`` DDPM steps (LDM_SCHEDULE) on smooth synthetic images
    in [-1, 1] (a cosine wave of random direction, one amplitude per channel): enough for bounded
    samples (|x| ~ 2 at 150 steps on an 8x8 model, ~17 s on one core), unlike random weights.
    ``cond_table`` (a UNet2DConditionModel): each sample sees a random row as its text states
    (an SDXL-class UNet: packed rows, ``models.eps_model.AddedCond``)."""
    from diffusers import DDPMScheduler

    from saq_deploy.models.eps_model import AddedCond, text_kwargs

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ch, size = unet.config.in_channels, unet.config.sample_size
    ab = DDPMScheduler(num_train_timesteps=1000, **LDM_SCHEDULE).alphas_cumprod
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    unet.train()
    for _ in range(steps):
        a = torch.rand(batch, 1, 1, 1, generator=g) * 6.2832
        x0 = torch.cos(2.0 * (xx * torch.cos(a) + yy * torch.sin(a))) * (torch.rand(batch, ch, 1, 1, generator=g) * 0.6 + 0.2)
        t = torch.randint(0, 1000, (batch,), generator=g)
        t[: batch * 3 // 10] = torch.randint(850, 1000, (batch * 3 // 10,), generator=g)  # the x0-amplifying end
        noise = torch.randn(x0.shape, generator=g)
        abt = ab[t].view(-1, 1, 1, 1)
        kw = {} if cond_table is None else text_kwargs(
            cond_table[torch.randint(0, len(cond_table), (batch,), generator=g)], AddedCond.of(unet.config))
        loss = ((unet(abt.sqrt() * x0 + (1 - abt).sqrt() * noise, t, **kw).sample - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval()


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


def calibrate_tiny_uncond(root: Path, name: str, overrides: dict) -> Path:
    """``tiny_unet_uncond`` trained briefly, saved as a diffusers folder (LDM schedule) and
    calibrated to ``root / name`` with minmax on 16 samples x 10 steps, plus ``overrides``."""
    from saq_deploy.calibrate.recipe import Recipe
    from saq_deploy.calibrate.run import calibrate

    torch.set_num_threads(1)
    pipe = save_pipeline_folder(root / "pipe", train_briefly(tiny_unet_uncond()), scheduler_kwargs=LDM_SCHEDULE)
    out = root / name
    calibrate(Recipe().with_overrides({"model.spec": str(pipe), "calibration.method": "minmax",
                                       "calibration.num_samples": 16, "calibration.steps": 10, **overrides}), out)
    return out


def digits_recipe(bits: str, method: str, *, num_samples: int, steps: int, **tables: dict) -> str:
    """A recipe file's text for builtin:digits, as a user writes one for ``calibrate -c`` (for the
    tests and benchmarks that go through the CLI; in-process ones use ``Recipe.with_overrides``).
    ``tables``: further ``[table]`` sections, e.g. ``qlora={"rank": 4, "mixstep": [3]}``."""
    def value(v) -> str:  # the TOML scalars and arrays recipes use; json's strings are TOML's
        if isinstance(v, bool):
            return "true" if v else "false"
        return "[" + ", ".join(map(value, v)) + "]" if isinstance(v, (list, tuple)) else json.dumps(v)

    sections = {"model": {"spec": "builtin:digits"}, "quant": {"bits": bits},
                "calibration": {"method": method, "num_samples": num_samples, "steps": steps}, **tables}
    return "".join(f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in keys.items())
                   for name, keys in sections.items())


def linear_schedule(num_train_timesteps: int = 1000):
    """The DDPM linear-beta VP schedule (1e-4 .. 0.02), built without diffusers: the toy eps models'."""
    import torch

    from saq_deploy.schedules import VPSchedule

    betas = torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64)
    return VPSchedule(torch.cumprod(1.0 - betas, 0))
