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

SDXL-class UNets (``addition_embed_type = "text_time"``) also take added conditioning: the file
then carries ``pooled`` (P, E), the prompts' pooled text embeddings (``text_embeds``), with
``uncond_pooled`` (1, E) beside ``uncond``, and optionally ``time_ids`` (1 or one per row, 6):
original size, crop top-left, target size in pixels; default the sample size times the VAE's
factor (8 without a VAE, SDXL's), crop (0, 0), as diffusers' SDXL pipeline computes them. Each
table row then packs its pooled embedding and time ids behind its text states
(``models.eps_model.AddedCond``), so every method and data path carries them unchanged.

``prompts`` / ``prompts_file`` / ``negative_prompt`` instead go through the pipeline's own
tokenizer and text encoder once (``models.text_encoder``; the negative prompt defaults to the
empty prompt, as in diffusers), giving the same table; for an SDXL-class pipeline through both its
text encoders, which also give the pooled rows (no negative prompt: zeros, as diffusers).

Everything here is checked before the model's data are collected: a wrong width, a missing file
or a missing negative embedding is one ConfigError line and leaves no folder behind."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saq_deploy.errors import ConfigError
from saq_deploy.models.eps_model import TIME_IDS
from saq_deploy.prompt_inputs import read_prompts_file

_SHAPES = "'cond' (P, L, D) prompt embeddings and 'uncond' (1, L, D) for the negative prompt"


@dataclass(frozen=True)
class PromptTable:
    table: Tensor  # (P [+ 1], L, D) float32: the prompts, then the negative prompt
    count: int  # P
    null_index: int | None  # P when there is a negative embedding (CFG), else None
    source: str
    source_sha256: str
    pooled: Tensor | None = None  # (P [+ 1], E) SDXL-class pooled text embeddings, the table's rows
    time_ids: Tensor | None = None  # (1 or P [+ 1], 6) from the file; None: from the sample size

    @property
    def length(self) -> int:
        return int(self.table.shape[1])

    @property
    def width(self) -> int:
        return int(self.table.shape[2])

    def info(self) -> dict:
        """What the artifact manifest records about the prompts."""
        return {"embeddings_file": self.source, "sha256": self.source_sha256, "prompts": self.count,
                "length": self.length, "width": self.width, "negative": self.null_index is not None,
                **({} if self.pooled is None else {"pooled": int(self.pooled.shape[1])})}


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
    pooled, time_ids = _added_tensors(tensors, where, int(cond.shape[0]), len(table))
    return PromptTable(table=table, count=int(cond.shape[0]), null_index=None if uncond is None else int(cond.shape[0]),
                       source=str(p.embeddings_file), source_sha256=sha256_file(path), pooled=pooled,
                       time_ids=time_ids)


def _added_tensors(tensors: dict, where: str, p: int, rows: int) -> tuple[Tensor | None, Tensor | None]:
    """The file's SDXL added conditioning: pooled rows (like the table's) and time ids, checked."""
    pooled, uncond_pooled, time_ids = tensors.get("pooled"), tensors.get("uncond_pooled"), tensors.get("time_ids")
    if pooled is None:
        for name, t in (("uncond_pooled", uncond_pooled), ("time_ids", time_ids)):
            if t is not None:
                raise ConfigError(f"{where} has '{name}' but no 'pooled' (P, E) tensor; add it or remove '{name}'")
        return None, None
    if pooled.ndim != 2 or pooled.shape[0] != p or not pooled.is_floating_point():
        raise ConfigError(f"{where}: 'pooled' must be a float tensor of shape ({p}, E), one row per 'cond' "
                          f"prompt, got {tuple(pooled.shape)}")
    rows_ = [pooled.float()]
    if rows > p:  # a negative prompt: its pooled embedding is the null row's
        if uncond_pooled is None or tuple(uncond_pooled.shape) != (1, pooled.shape[1]):
            got = "none" if uncond_pooled is None else str(tuple(uncond_pooled.shape))
            raise ConfigError(f"{where} has 'uncond' but its 'uncond_pooled' must be (1, {pooled.shape[1]}) "
                              f"(the negative prompt's pooled embedding), got {got}")
        rows_.append(uncond_pooled.float())
    if time_ids is not None and (time_ids.ndim != 2 or time_ids.shape[0] not in (1, rows)
                                 or time_ids.shape[1] != TIME_IDS):
        raise ConfigError(f"{where}: 'time_ids' must have shape (1, {TIME_IDS}) or ({rows}, {TIME_IDS}) "
                          f"(original H, W, crop top, left, target H, W), got {tuple(time_ids.shape)}")
    out = torch.cat(rows_).contiguous(), None if time_ids is None else time_ids.float()
    if not all(bool(torch.isfinite(t).all()) for t in out if t is not None):
        raise ConfigError(f"{where} holds NaN or infinite values")
    return out


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
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        raise ConfigError(f"this UNet has addition_embed_type = {cfg.get('addition_embed_type')!r}, which "
                          "calibration does not support (SDXL-class 'text_time' is supported)")
    dims = cfg.get("cross_attention_dim")
    dims = {int(d) for d in dims} if isinstance(dims, (list, tuple)) else {int(dims)}
    if dims != {prompts.width}:
        raise ConfigError(f"prompts.embeddings_file '{prompts.source}' holds embeddings of width D = "
                          f"{prompts.width}, but this UNet's cross_attention_dim is "
                          f"{', '.join(map(str, sorted(dims)))}: encode the prompts with this pipeline's text encoder")
    return dataclasses.replace(loaded, num_classes=prompts.count, null_label=prompts.null_index,
                               cond_table=_with_added(loaded, prompts))


def _with_added(loaded, prompts: PromptTable) -> Tensor:
    """The prompt table, with each row's pooled embedding and time ids packed behind it for an
    SDXL-class UNet (models.eps_model.AddedCond); as it is for other text UNets."""
    from saq_deploy.models.eps_model import AddedCond, default_time_ids

    added = AddedCond.of(loaded.unet.config)
    where = f"prompts.embeddings_file '{prompts.source}'" if prompts.source != "text_encoder" else "[prompts]"
    if added is None:
        if prompts.pooled is not None:
            raise ConfigError(f"{where} has 'pooled' embeddings, but this UNet takes no added conditioning "
                              "(only SDXL-class addition_embed_type = 'text_time' ones do): remove 'pooled'")
        return prompts.table
    if prompts.pooled is None:
        neg = " and 'uncond_pooled' (1, E)" if prompts.null_index is not None else ""
        raise ConfigError(f"this UNet is SDXL-class (addition_embed_type = 'text_time', pooled width E = "
                          f"{added.text_embeds}): add 'pooled' (P, E){neg} pooled text embeddings to {where}")
    if prompts.pooled.shape[1] != added.text_embeds:
        raise ConfigError(f"{where} holds pooled embeddings of width E = {prompts.pooled.shape[1]}, but this "
                          f"UNet's added conditioning takes E = {added.text_embeds} (projection_class_embeddings_"
                          "input_dim - 6 * addition_time_embed_dim)")
    rows = len(prompts.table)
    time_ids = default_time_ids(loaded) if prompts.time_ids is None else prompts.time_ids
    return added.pack(prompts.table, prompts.pooled, time_ids.expand(rows, -1)).contiguous()


def _encoded_table(recipe) -> PromptTable:
    """The recipe's prompts through the pipeline's own tokenizer + text encoder (models.text_encoder)."""
    import hashlib

    from saq_deploy.models.text_encoder import open_text_encoder, pipeline_root, require_transformers

    prompts = read_prompts(recipe)
    require_transformers()
    encoder = open_text_encoder(pipeline_root(recipe.model.spec))
    encoder.warn(prompts)
    # a recipe cannot say "no negative prompt" apart from its default "": both are diffusers' None
    # (an SDXL pipeline's force_zeros_for_empty_prompt then zeros the null row)
    table, pooled = encoder.encode([*prompts, recipe.prompts.negative_prompt or None])
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in (table, pooled) if t is not None)).hexdigest()
    return PromptTable(table=table, count=len(prompts), null_index=len(prompts),
                       source="text_encoder", source_sha256=digest, pooled=pooled)


def read_prompts(recipe) -> list[str]:
    """``prompts.prompts`` then the lines of ``prompts.prompts_file`` (blank lines skipped)."""
    p = recipe.prompts
    prompts = list(p.prompts)
    if p.prompts_file:
        prompts += read_prompts_file(Path(p.prompts_file), "prompts.prompts_file")
    if not prompts:
        raise ConfigError("[prompts] sets only negative_prompt: give prompts.prompts or prompts.prompts_file")
    return prompts
