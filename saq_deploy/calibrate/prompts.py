"""Prompt conditioning for calibrating cross-attention UNets (``UNet2DConditionModel``).

The recipe's ``[prompts] embeddings_file`` is a safetensors file with ``cond`` (P, L, D), the P
prompts' encoder hidden states, and ``uncond`` (1, L, D), the negative prompt's (needed for
classifier-free guidance, ``calibration.cfg != 1``). They are stacked into one table of P (+ 1)
rows: prompt i is row i, the negative prompt row P. Calibration then treats a text UNet like a
class-conditional one with P classes and null label P: the trajectory records' ``label`` column
holds the prompt index (cycled over the samples), CFG doubles each record with the null row, and
every UNet call gets ``encoder_hidden_states = table[label]`` (``models.eps_model.cond_kwargs``).
The table is stored once in the data folder (``dataset.COND_TABLE_FILE``, hashed in its manifest);
the source file's sha256 enters the run's recipe hash (resume) and the artifact manifest.

``prompts`` / ``prompts_file`` / ``negative_prompt`` instead go through the pipeline's own
tokenizer and text encoder once (``calibrate.text_encoder``; the negative prompt defaults to the
empty prompt, as in diffusers), giving the same table.

Everything here is checked before the model's data are collected: a wrong width, a missing file
or a missing negative embedding is one ConfigError line and leaves no folder behind."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saq_deploy.errors import ConfigError

_SHAPES = "'cond' (P, L, D) prompt embeddings and 'uncond' (1, L, D) for the negative prompt"


@dataclass(frozen=True)
class PromptTable:
    table: Tensor  # (P [+ 1], L, D) float32: the prompts, then the negative prompt
    count: int  # P
    null_index: int | None  # P when there is a negative embedding (CFG), else None
    source: str
    source_sha256: str

    @property
    def length(self) -> int:
        return int(self.table.shape[1])

    @property
    def width(self) -> int:
        return int(self.table.shape[2])

    def info(self) -> dict:
        """What the artifact manifest records about the prompts."""
        return {"embeddings_file": self.source, "sha256": self.source_sha256, "prompts": self.count,
                "length": self.length, "width": self.width, "negative": self.null_index is not None}


def load_prompt_table(recipe) -> PromptTable | None:
    """Read and check ``[prompts]`` (no model needed); None when the recipe has no prompts."""
    from safetensors.torch import load_file

    from saq_deploy.utils.io import sha256_file

    p = recipe.prompts
    if p.empty:
        return None
    text = p.prompts or p.prompts_file or p.negative_prompt
    if text and p.embeddings_file:
        raise ConfigError("set prompts.embeddings_file or prompts.prompts / prompts_file / negative_prompt, "
                          "not both")
    if text:
        return _encoded_table(recipe)
    path = Path(p.embeddings_file).expanduser()
    where = f"prompts.embeddings_file '{path}'"
    if not path.is_file():
        raise ConfigError(f"{where} does not exist" + (" (it is a folder)" if path.is_dir() else "")
                          + f"; it must be a safetensors file with {_SHAPES}")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise ConfigError(f"{where} is not a valid safetensors file ({str(e).splitlines()[0] if str(e) else e!r})") from e
    if "cond" not in tensors:
        raise ConfigError(f"{where} has no 'cond' tensor (keys: {', '.join(sorted(tensors)) or 'none'}); "
                          f"it needs {_SHAPES}")
    cond, uncond = tensors["cond"], tensors.get("uncond")
    if cond.ndim != 3 or min(cond.shape) < 1 or not cond.is_floating_point():
        raise ConfigError(f"{where}: 'cond' must be a float tensor of shape (P, L, D), got "
                          f"{tuple(cond.shape)} {cond.dtype}")
    if uncond is not None and (uncond.ndim != 3 or uncond.shape[0] != 1 or uncond.shape[1:] != cond.shape[1:]
                               or not uncond.is_floating_point()):
        raise ConfigError(f"{where}: 'uncond' must have shape (1, {cond.shape[1]}, {cond.shape[2]}) like one "
                          f"'cond' row, got {tuple(uncond.shape)}")
    rows = [cond.float()] + ([] if uncond is None else [uncond.float()])
    table = torch.cat(rows).contiguous()
    if not bool(torch.isfinite(table).all()):
        raise ConfigError(f"{where} holds NaN or infinite values")
    cfg = recipe.calibration.cfg
    if uncond is None and cfg != 1.0:
        raise ConfigError(f"calibration.cfg = {cfg} needs the negative prompt's embedding: {where} has no "
                          "'uncond' (1, L, D) tensor; add one (the empty prompt's) or set calibration.cfg = 1")
    return PromptTable(table=table, count=int(cond.shape[0]), null_index=None if uncond is None else int(cond.shape[0]),
                       source=str(p.embeddings_file), source_sha256=sha256_file(path))


def bind_prompts(loaded, prompts: PromptTable | None):
    """The LoadedModel calibration works on: a text UNet with its prompt table, the prompt index
    as its integer cond; other kinds unchanged (and refuse ``[prompts]``)."""
    if loaded.kind != "text":
        if prompts is not None:
            raise ConfigError(f"[prompts] applies to cross-attention UNets (UNet2DConditionModel); this model "
                              f"is '{loaded.kind}': remove the [prompts] section")
        return loaded
    if prompts is None:
        raise ConfigError("this UNet uses cross-attention (UNet2DConditionModel): calibration needs prompt "
                          f"embeddings; set [prompts] embeddings_file = \"emb.safetensors\" with {_SHAPES}")
    cfg = loaded.unet.config
    if cfg.get("addition_embed_type"):
        raise ConfigError(f"this UNet has addition_embed_type = {cfg.get('addition_embed_type')!r} (SDXL-class "
                          "added conditioning), which calibration does not support yet")
    dims = cfg.get("cross_attention_dim")
    dims = {int(d) for d in dims} if isinstance(dims, (list, tuple)) else {int(dims)}
    if dims != {prompts.width}:
        raise ConfigError(f"prompts.embeddings_file '{prompts.source}' holds embeddings of width D = "
                          f"{prompts.width}, but this UNet's cross_attention_dim is "
                          f"{', '.join(map(str, sorted(dims)))}: encode the prompts with this pipeline's text encoder")
    return dataclasses.replace(loaded, num_classes=prompts.count, null_label=prompts.null_index,
                               cond_table=prompts.table)


def _encoded_table(recipe) -> PromptTable:
    """The recipe's prompts through the pipeline's own tokenizer + text encoder (calibrate.text_encoder)."""
    import hashlib

    from saq_deploy.calibrate.text_encoder import (
        encode_prompts,
        pipeline_root,
        read_prompts,
        require_transformers,
    )

    prompts = read_prompts(recipe)
    require_transformers()
    table = encode_prompts(pipeline_root(recipe.model.spec), prompts, recipe.prompts.negative_prompt)
    digest = hashlib.sha256(table.numpy().tobytes()).hexdigest()  # the embeddings themselves
    return PromptTable(table=table, count=len(prompts), null_index=len(prompts),
                       source="text_encoder", source_sha256=digest)
