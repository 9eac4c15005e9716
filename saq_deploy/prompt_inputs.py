"""What a text-to-image (cross-attention) UNet is sampled with: prompts through the pipeline's own
text encoder, precomputed embeddings (``--cond-file``), a calibrated artifact's stored calibration
prompts, or the pipeline's default prompts (``saq_model.json`` ``default_prompts``), in that order.

The prompts become a table of encoder states (P prompts + the negative prompt, which is CFG's
unconditional row, as diffusers' pipelines do); sample i gets prompt i mod P, so a grid with P
columns shows one prompt per column."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from saq_deploy.errors import ConfigError, ModelLoadError


@dataclass
class PromptInputs:
    cond: Tensor | None  # (n, L, D) encoder states, or (n,) class labels, or None
    null: Tensor | int | None  # CFG's unconditional input
    prompts: list[str] | None = None  # the prompts, when they were text
    source: str | None = None  # "prompts" | "cond-file" | "artifact" | "default-prompts"
    warnings: list[str] = field(default_factory=list)

    @property
    def columns(self) -> int | None:
        return len(self.prompts) if self.prompts else None


def load_cond_file(path: Path, n: int, model=None) -> tuple[Tensor, Tensor | None]:
    """(n, L, D) 'cond' and optional (1, L, D) 'uncond' of a --cond-file. For an SDXL-class UNet
    (``model`` with ``addition_embed_type="text_time"``) also its 'pooled' (1|n, E) /
    'uncond_pooled' (1, E) and optional 'time_ids' (1|n, 6), packed behind the states
    (``models.eps_model.AddedCond``)."""
    from safetensors.torch import load_file

    if not path.exists():
        raise ModelLoadError(f"--cond-file '{path}' does not exist")
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise ModelLoadError(f"--cond-file '{path}' is not a valid safetensors file ({e})") from e
    if "cond" not in tensors:
        raise ConfigError(f"--cond-file '{path}' has no 'cond' tensor (keys: {', '.join(tensors) or 'none'})")
    cond = tensors["cond"].float()
    if cond.ndim != 3 or cond.shape[0] not in (1, n):
        raise ConfigError(f"'cond' must have shape (1 or {n}, L, D), got {tuple(cond.shape)}")
    cond = cond.expand(n, -1, -1).contiguous()
    uncond = tensors.get("uncond")
    uncond = None if uncond is None else uncond.float()[:1]
    added = _added_layout(model)
    if added is None:
        return cond, uncond
    return _pack_added(path, tensors, added, model, n, cond, uncond)


def _added_layout(model):
    from saq_deploy.models.eps_model import AddedCond

    if model is None:
        return None
    unet = getattr(model, "unet", None)
    config = unet.config if unet is not None else getattr(model, "meta", {}).get("unet_config", {})
    return AddedCond.of(config)


def _pack_added(path, tensors, added, model, n, cond, uncond):
    from saq_deploy.models.eps_model import default_time_ids

    want = "'pooled' (1|n, E)" + (" and 'uncond_pooled' (1, E)" if uncond is not None else "")
    pooled, upooled = tensors.get("pooled"), tensors.get("uncond_pooled")
    if pooled is None or (uncond is not None and upooled is None):
        raise ConfigError(f"--cond-file '{path}': this SDXL-class UNet (addition_embed_type 'text_time') also "
                          f"needs {want}, the pooled text embeddings, of width E = {added.text_embeds}")
    for name, t in (("pooled", pooled), ("uncond_pooled", upooled)):
        if t is not None and (t.ndim != 2 or t.shape[-1] != added.text_embeds or t.shape[0] not in (1, n)):
            raise ConfigError(f"--cond-file '{path}': '{name}' must have shape (1 or {n}, {added.text_embeds}), "
                              f"got {tuple(t.shape)}")
    time_ids = tensors.get("time_ids")
    time_ids = default_time_ids(model) if time_ids is None else time_ids.float()
    if time_ids.ndim != 2 or time_ids.shape[-1] != 6 or time_ids.shape[0] not in (1, n):
        raise ConfigError(f"--cond-file '{path}': 'time_ids' must have shape (1 or {n}, 6), got {tuple(time_ids.shape)}")
    cond = added.pack(cond, pooled.float().expand(n, -1), time_ids.expand(n, -1))
    if uncond is not None:
        uncond = added.pack(uncond, upooled.float()[:1], time_ids[:1])
    return cond, uncond


def read_prompts_file(path: Path, name: str = "--prompts-file") -> list[str]:
    """Prompts of a text file, one per line (blank lines skipped); ``name`` is how the errors call
    the file: the sample option, or the recipe key for calibration."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{name} '{path}' does not exist (one prompt per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name} '{path}' is not UTF-8 text ({e.reason})") from None
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise ConfigError(f"{name} '{path}' holds no prompts (one prompt per line)")
    return prompts


def source_spec(model) -> str:
    """The model spec the text encoder is found from: an engine's source model, a builtin's name, or
    the folder the UNet was loaded from."""
    manifest = getattr(model, "manifest", None)
    if manifest is not None and "source" in manifest:  # an engine
        return str(manifest["source"]["model_spec"])
    name = str(getattr(model, "name", ""))
    return name if name.startswith("builtin:") else str(model.unet_dir)


def default_prompts(spec: str) -> list[str]:
    """The pipeline's ``unet/saq_model.json`` ``default_prompts`` (empty when there are none)."""
    from saq_deploy.models.loading import builtin_dir, resolve_unet_dir

    try:
        folder = builtin_dir(spec.split(":", 1)[1]) if spec.startswith("builtin:") else Path(spec)
        unet_dir, _ = resolve_unet_dir(folder)
    except (ConfigError, ModelLoadError):  # the source folder may be gone (an engine moved elsewhere)
        return []
    meta = unet_dir / "saq_model.json"
    return list(json.loads(meta.read_text()).get("default_prompts", [])) if meta.is_file() else []


def prompt_inputs(model, n: int, *, prompts: list[str] | None = None, negative_prompt: str | None = None,
                  cond_file: Path | None = None, calibrated=None) -> PromptInputs:
    """Sampling inputs for ``n`` samples of ``model`` (a LoadedModel or an engine); ``calibrated``:
    the CalibratedModel whose fake-quant UNet is sampled, if any (its stored prompts)."""
    kind = model.kind
    if kind != "text":
        if prompts or negative_prompt is not None or cond_file is not None:
            what = "--prompt / --negative-prompt" if (prompts or negative_prompt is not None) else "--cond-file"
            hint = "use --label" if kind == "class" else "it takes no conditioning"
            raise ConfigError(f"{what} applies to text-to-image (cross-attention) UNets; this model is "
                              f"{'class-conditional' if kind == 'class' else 'unconditional'}: {hint}")
        return PromptInputs(None, model.null_label)
    if prompts and cond_file is not None:
        raise ConfigError("give --prompt / --prompts-file or --cond-file (precomputed embeddings), not both")
    if cond_file is not None:
        if negative_prompt is not None:
            raise ConfigError("--negative-prompt needs --prompt: with --cond-file the negative is its 'uncond'")
        cond, null = load_cond_file(Path(cond_file), n, model)
        return PromptInputs(cond, null, source="cond-file")
    spec = source_spec(model)
    source = "prompts"
    if not prompts:
        if calibrated is not None and calibrated.manifest.get("prompts") and negative_prompt is None:
            cond, null = calibrated.prompt_cond(n)
            return PromptInputs(cond, null, source="artifact")
        prompts, source = default_prompts(spec), "default-prompts"
        if not prompts:
            raise ConfigError("this UNet uses cross-attention: pass --prompt TEXT (repeatable) or --prompts-file, "
                              "or --cond-file with precomputed embeddings")
    from saq_deploy.models.eps_model import default_time_ids
    from saq_deploy.models.text_encoder import open_text_encoder, pipeline_root

    encoder = open_text_encoder(pipeline_root(spec))
    warnings = encoder.truncation_warnings(prompts)  # the caller prints them (sample) or returns them
    # None: no negative prompt given (an SDXL pipeline then zeros the null row, as diffusers)
    table = encoder.table(prompts, negative_prompt, warn=False, time_ids=default_time_ids(model))
    p = len(prompts)
    return PromptInputs(table[torch.arange(n) % p].contiguous(), table[p:p + 1], prompts, source, warnings)
