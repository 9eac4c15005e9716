"""Prompts through a pipeline's own tokenizer and text encoder (``tokenizer/``, ``text_encoder/``:
transformers' ``CLIPTokenizer`` / ``CLIPTextModel``), run once in FP32 on the CPU, offline.

As diffusers' Stable Diffusion pipelines do: every prompt is padded to the tokenizer's
``model_max_length`` and truncated there (with a warning naming the prompt), and the encoder's
last hidden state is the UNet's ``encoder_hidden_states``; the negative prompt (default: the empty
prompt) is encoded the same way. ``transformers`` is an optional extra, imported only here."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

from saq_deploy.errors import ConfigError

INSTALL_HINT = "pip install 'saq-deploy[text]' (transformers)"


def read_prompts(recipe) -> list[str]:
    """``prompts.prompts`` then the lines of ``prompts.prompts_file`` (blank lines skipped)."""
    p = recipe.prompts
    prompts = list(p.prompts)
    if p.prompts_file:
        path = Path(p.prompts_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompts.prompts_file '{path}' does not exist (one prompt per line)")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ConfigError(f"prompts.prompts_file '{path}' is not UTF-8 text ({e.reason})") from None
        from_file = [ln.strip() for ln in lines if ln.strip()]
        if not from_file:
            raise ConfigError(f"prompts.prompts_file '{path}' holds no prompts (one prompt per line)")
        prompts += from_file
    if not prompts:
        raise ConfigError("[prompts] sets only negative_prompt: give prompts.prompts or prompts.prompts_file")
    return prompts


def pipeline_root(spec: str) -> Path:
    """The pipeline folder whose ``tokenizer/`` and ``text_encoder/`` encode the prompts."""
    from saq_deploy.models.loading import resolve_unet_dir

    if str(spec).startswith("builtin:"):
        raise ConfigError(f"prompts need a pipeline folder with tokenizer/ and text_encoder/; '{spec}' has none")
    unet_dir, _ = resolve_unet_dir(Path(spec).expanduser())
    root = unet_dir.parent if unet_dir.name == "unet" else unet_dir
    missing = [d for d in ("tokenizer", "text_encoder") if not (root / d / "config.json").exists()
               and not (root / d / "tokenizer_config.json").exists()]
    if missing:
        raise ConfigError(f"'{root}' has no {' or '.join(f'{d}/' for d in missing)}: prompts are encoded with the "
                          "pipeline's own text encoder; give precomputed prompts.embeddings_file instead")
    return root


def require_transformers():
    """The transformers module, or one line saying how to get it (an optional extra)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"encoding prompts needs the 'transformers' package: {INSTALL_HINT}; or give "
                          "precomputed prompts.embeddings_file") from None
    return transformers


def encode_prompts(root: Path, prompts: list[str], negative: str) -> Tensor:
    """(P + 1, L, D) float32: the prompts' encoder states, then the negative prompt's."""
    transformers = require_transformers()
    from transformers import CLIPTextModel, CLIPTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        tok = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        enc = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True).eval().float()
    except Exception as e:  # transformers raises many types for broken folders
        raise ConfigError(f"could not load the tokenizer / text encoder of '{root}': {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    max_len = int(tok.model_max_length)
    texts = [*prompts, negative]
    for i, text in enumerate(prompts):
        n = len(tok(text, truncation=False).input_ids)
        if n > max_len:  # diffusers' pipelines truncate and warn too
            kept = tok.decode(tok(text, truncation=True, max_length=max_len).input_ids, skip_special_tokens=True)
            print(f"warning: prompt {i + 1} is {n} tokens, longer than the tokenizer's maximum {max_len}: "
                  f"truncated to '{kept}'", file=sys.stderr)
    ids = tok(texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        states = enc(ids)[0]
    return states.float().contiguous()
