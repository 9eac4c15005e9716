"""Prompts through a pipeline's own tokenizer(s) and text encoder(s), run once in FP32 on the CPU,
offline. ``transformers`` is an optional extra, imported only here.

Two layouts, chosen in one place (:func:`encoder_class`, from the pipeline's UNet config):

- SD-1.x/2.x (``tokenizer/``, ``text_encoder/``: ``CLIPTokenizer`` / ``CLIPTextModel``): as diffusers'
  Stable Diffusion pipelines, the encoder's last hidden state is the UNet's
  ``encoder_hidden_states``; the negative prompt (default: the empty prompt) is encoded the same way.
- SDXL-class (the UNet has ``addition_embed_type="text_time"``; also ``tokenizer_2/``,
  ``text_encoder_2/``: ``CLIPTextModelWithProjection``), as ``StableDiffusionXLPipeline.encode_prompt``:
  the states are both encoders' penultimate hidden states concatenated, the pooled embedding
  (``text_embeds``) is encoder 2's projection, and with no negative prompt and
  ``force_zeros_for_empty_prompt`` (model_index.json, default true) the negative row is all zeros.
  The pooled embedding and the time ids are packed behind the states (``AddedCond``), so the
  table is the one tensor calibration, ``sample`` and the server already carry.

Every prompt is padded to the tokenizer's ``model_max_length`` and truncated there (with a warning
naming the prompt). A text of ``None`` is "no negative prompt given" (diffusers' ``None``)."""

from __future__ import annotations

import json
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


def unet_added(root: Path):
    """The SDXL added-conditioning layout of ``root``'s UNet (``AddedCond``), None for other UNets."""
    from saq_deploy.models.eps_model import AddedCond

    cfg = root / "unet" / "config.json" if (root / "unet").is_dir() else root / "config.json"
    return AddedCond.of(json.loads(cfg.read_text())) if cfg.is_file() else None


def encoder_class(root: Path) -> type[TextEncoder]:
    """The one choice of single vs dual text encoding: an SDXL-class UNet takes both encoders'
    states and a pooled embedding, any other cross-attention UNet one encoder's states."""
    return DualTextEncoder if unet_added(root) is not None else TextEncoder


def pipeline_root(spec: str) -> Path:
    """The pipeline folder whose tokenizer(s) and text encoder(s) encode the prompts."""
    from saq_deploy.models.loading import builtin_dir, resolve_unet_dir

    spec_s = str(spec)
    folder = builtin_dir(spec_s.split(":", 1)[1]) if spec_s.startswith("builtin:") else Path(spec_s).expanduser()
    unet_dir, _ = resolve_unet_dir(folder)
    root = unet_dir.parent if unet_dir.name == "unet" else unet_dir
    cls = encoder_class(root)
    missing = [d for d in cls.DIRS if not (root / d / "config.json").exists()
               and not (root / d / "tokenizer_config.json").exists()]
    if missing:
        raise ConfigError(f"'{root}' has no {' or '.join(f'{d}/' for d in missing)}: {cls.NEEDS}; "
                          + PRECOMPUTED_HINT)
    return root


def open_text_encoder(root: Path) -> TextEncoder:
    """The text encoding ``root``'s UNet takes (calibrate, ``sample --prompt`` and the server)."""
    return encoder_class(root)(root)


def require_transformers():
    """The transformers module, or one line saying how to get it (an optional extra)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"encoding prompts needs the 'transformers' package: {INSTALL_HINT}; or "
                          + PRECOMPUTED_HINT) from None
    return transformers


def _load(root: Path, what: str, load):
    try:
        return load()
    except Exception as e:  # transformers raises many types for broken folders
        raise ConfigError(f"could not load the {what} of '{root}': {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _ids(tokenizer, texts: list[str], max_length: int) -> Tensor:
    return tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


class TextEncoder:
    """A pipeline's tokenizer + text encoder, loaded once (FP32, CPU): calibration encodes its prompts
    with it, ``sample --prompt`` and the server every request's prompts."""

    DIRS: tuple[str, ...] = ("tokenizer", "text_encoder")
    NEEDS = "prompts are encoded with the pipeline's own text encoder"
    added = None  # AddedCond of an SDXL-class UNet (DualTextEncoder)

    def __init__(self, root: Path) -> None:
        transformers = require_transformers()
        from transformers import CLIPTextModel, CLIPTokenizer

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.tokenizer, self.encoder = _load(root, "tokenizer / text encoder", lambda: (
            CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
            CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True).eval().float()))
        self.root = root
        self.max_length = int(self.tokenizer.model_max_length)

    @property
    def width(self) -> int:
        """D of the states it makes (the UNet's cross_attention_dim)."""
        return int(self.encoder.config.hidden_size)

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

    def warn(self, prompts: list[str]) -> None:
        for w in self.truncation_warnings(prompts):
            print(f"warning: {w}", file=sys.stderr)

    def encode(self, texts: list[str | None]) -> tuple[Tensor, Tensor | None]:
        """((len, L, D) float32 states, pooled (len, E) or None); no negative prompt is the empty one."""
        with torch.no_grad():
            states = self.encoder(_ids(self.tokenizer, ["" if t is None else t for t in texts], self.max_length))[0]
        return states.float().contiguous(), None

    def __call__(self, texts: list[str | None]) -> Tensor:
        """(len(texts), L, D) float32 encoder states, padded to ``max_length`` as diffusers does."""
        return self.encode(texts)[0]

    def cond(self, texts: list[str | None], time_ids: Tensor | None = None) -> Tensor:
        """The UNet's ``cond`` rows for ``texts`` (``time_ids`` (1, 6): SDXL-class only)."""
        return self(texts)

    def table(self, prompts: list[str], negative: str | None, *, warn: bool = True,
              time_ids: Tensor | None = None) -> Tensor:
        """(P + 1, L, D): the prompts' cond rows, then the negative prompt's (CFG's null row)."""
        if warn:
            self.warn(prompts)
        return self.cond([*prompts, negative], time_ids)


class DualTextEncoder(TextEncoder):
    """An SDXL pipeline's two tokenizers and text encoders, as ``StableDiffusionXLPipeline.encode_prompt``
    calls them (``prompt_2`` = ``prompt``, no clip skip)."""

    DIRS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    NEEDS = ("this SDXL-class UNet (addition_embed_type 'text_time') takes prompts through the pipeline's own "
             "two text encoders")

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        self.tokenizer_2, self.encoder_2 = _load(root, "tokenizer_2 / text_encoder_2", lambda: (
            CLIPTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True),
            CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", local_files_only=True).eval().float()))
        index = root / "model_index.json"
        index = json.loads(index.read_text()) if index.is_file() else {}
        self.force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))  # diffusers' default
        self.added = unet_added(root)
        self._check(root, index)

    def _check(self, root: Path, index: dict) -> None:
        """The shapes diffusers' pipeline would fail on later, as one line now."""
        if index.get("requires_aesthetics_score"):  # a refiner: 5 time ids ending in an aesthetic score
            raise ConfigError(f"'{root}' is an SDXL refiner (requires_aesthetics_score): its aesthetic-score time "
                              "ids are not supported; " + PRECOMPUTED_HINT)
        if int(self.tokenizer_2.model_max_length) != self.max_length:
            raise ConfigError(f"'{root}': tokenizer/ pads to {self.max_length} tokens but tokenizer_2/ to "
                              f"{self.tokenizer_2.model_max_length}; both encoders' states must have one length")
        proj = int(self.encoder_2.config.projection_dim)
        if self.width != self.added.width or proj != self.added.text_embeds:
            raise ConfigError(f"'{root}': the text encoders make states of width {self.width} and pooled "
                              f"embeddings of width {proj}, but the UNet takes {self.added.width} "
                              f"(cross_attention_dim) and {self.added.text_embeds} (its text_embeds)")

    @property
    def width(self) -> int:
        return int(self.encoder.config.hidden_size) + int(self.encoder_2.config.hidden_size)

    def encode(self, texts: list[str | None]) -> tuple[Tensor, Tensor]:
        given = ["" if t is None else t for t in texts]
        with torch.no_grad():
            one = self.encoder(_ids(self.tokenizer, given, self.max_length), output_hidden_states=True)
            two = self.encoder_2(_ids(self.tokenizer_2, given, self.max_length), output_hidden_states=True)
        states = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1).float()
        pooled = two.text_embeds.float()
        zero = torch.tensor([t is None and self.force_zeros for t in texts])
        if bool(zero.any()):  # diffusers: no negative prompt + force_zeros_for_empty_prompt -> zeros
            states[zero], pooled[zero] = 0.0, 0.0
        return states.contiguous(), pooled.contiguous()

    def cond(self, texts: list[str | None], time_ids: Tensor | None = None) -> Tensor:
        if time_ids is None:
            raise ValueError("an SDXL-class UNet's cond needs its (1, 6) time ids")
        states, pooled = self.encode(texts)
        return self.added.pack(states, pooled, time_ids.float().expand(len(texts), -1)).contiguous()
