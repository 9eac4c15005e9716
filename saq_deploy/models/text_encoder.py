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
# what a user whose text encoder lives elsewhere gives instead (recipe key / sample option)
PRECOMPUTED_HINT = "give precomputed embeddings instead (recipe prompts.embeddings_file, sample --cond-file)"


def truncation_warning(name: str, tokens: int, max_length: int, kept: str) -> str:
    """The one wording of the over-long prompt warning, for calibrate, sample and the server alike
    (``name`` says which prompt: "prompt 3", "'negative_prompt'")."""
    return f"{name} is {tokens} tokens, longer than the tokenizer's maximum {max_length}: truncated to '{kept}'"


def pipeline_root(spec: str) -> Path:
    """The pipeline folder whose ``tokenizer/`` and ``text_encoder/`` encode the prompts."""
    from saq_deploy.models.loading import builtin_dir, resolve_unet_dir

    spec_s = str(spec)
    folder = builtin_dir(spec_s.split(":", 1)[1]) if spec_s.startswith("builtin:") else Path(spec_s).expanduser()
    unet_dir, _ = resolve_unet_dir(folder)
    root = unet_dir.parent if unet_dir.name == "unet" else unet_dir
    missing = [d for d in ("tokenizer", "text_encoder") if not (root / d / "config.json").exists()
               and not (root / d / "tokenizer_config.json").exists()]
    if missing:
        raise ConfigError(f"'{root}' has no {' or '.join(f'{d}/' for d in missing)}: prompts are encoded with the "
                          "pipeline's own text encoder; " + PRECOMPUTED_HINT)
    return root


def require_transformers():
    """The transformers module, or one line saying how to get it (an optional extra)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"encoding prompts needs the 'transformers' package: {INSTALL_HINT}; or "
                          + PRECOMPUTED_HINT) from None
    return transformers


class TextEncoder:
    """A pipeline's tokenizer + text encoder, loaded once (FP32, CPU): calibration encodes its prompts
    with it, ``sample --prompt`` and the server every request's prompts."""

    def __init__(self, root: Path) -> None:
        transformers = require_transformers()
        from transformers import CLIPTextModel, CLIPTokenizer

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
            self.encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True).eval().float()
        except Exception as e:  # transformers raises many types for broken folders
            raise ConfigError(f"could not load the tokenizer / text encoder of '{root}': {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
        self.root = root
        self.max_length = int(self.tokenizer.model_max_length)

    def truncated(self, prompts: list[str]) -> list[tuple[int, int, str]]:
        """(index, token count, kept text) of each prompt longer than the tokenizer's maximum."""
        tok, out = self.tokenizer, []
        for i, text in enumerate(prompts):
            n = len(tok(text, truncation=False).input_ids)
            if n > self.max_length:
                kept = tok.decode(tok(text, truncation=True, max_length=self.max_length).input_ids,
                                  skip_special_tokens=True)
                out.append((i, n, kept))
        return out

    def truncation_warnings(self, prompts: list[str]) -> list[str]:
        """One warning per prompt the tokenizer will cut (diffusers' pipelines truncate and warn too)."""
        return [truncation_warning(f"prompt {i + 1}", n, self.max_length, kept)
                for i, n, kept in self.truncated(prompts)]

    def __call__(self, texts: list[str]) -> Tensor:
        """(len(texts), L, D) float32 last hidden states, padded to ``max_length`` as diffusers does."""
        ids = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            return self.encoder(ids)[0].float().contiguous()

    def table(self, prompts: list[str], negative: str, *, warn: bool = True) -> Tensor:
        """(P + 1, L, D): the prompts' encoder states, then the negative prompt's (CFG's null row)."""
        if warn:
            for w in self.truncation_warnings(prompts):
                print(f"warning: {w}", file=sys.stderr)
        return self([*prompts, negative])


def encode_prompts(root: Path, prompts: list[str], negative: str) -> Tensor:
    """(P + 1, L, D) float32: the prompts' encoder states, then the negative prompt's."""
    return TextEncoder(root).table(prompts, negative)
