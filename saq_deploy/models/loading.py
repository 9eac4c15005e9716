"""Load a diffusion UNet (built-in or a local diffusers folder) with its noise schedule.

Accepted ``--model`` values:
- ``builtin:digits``: the committed reference model; ``builtin:digits-text``: the committed
  text-to-image pipeline folder (loaded through the same path as any SD-1.x pipeline folder);
- a diffusers UNet folder (``config.json`` + weights; ``UNet2DModel`` or ``UNet2DConditionModel``)
  with ``scheduler_config.json`` beside it or in ``../scheduler/`` (pipeline layout); its weights
  must match the config key for key (no layer is left randomly initialised);
- a diffusers pipeline folder: ``unet/`` and ``scheduler/``, with or without ``model_index.json``,
  and an optional ``vae/`` (AutoencoderKL) that decodes latents (``LoadedModel.decode``).
Nothing is ever downloaded: only local paths are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saq_deploy.errors import ConfigError, ModelLoadError

BUILTINS: dict[str, str] = {
    "digits": "class-conditional DDPM UNet2DModel, 1x16x16, 10 classes + null class for CFG, "
    "trained on scikit-learn's digits",
    "digits-text": "text-to-image pipeline (UNet2DConditionModel with SD-1.x cross-attention blocks, CLIP "
    "text encoder and tokenizer), 1x16x16, prompts like 'a bold seven', trained on scikit-learn's digits",
}
SUPPORTED_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
MODEL_META_FILE = "saq_model.json"  # optional: {"num_classes": 10, "null_label": 10}


@dataclass
class LoadedModel:
    name: str
    unet: Any  # diffusers UNet2DModel / UNet2DConditionModel, eval mode, float32
    scheduler_config: dict
    unet_dir: Path
    source_hash: str
    num_classes: int | None = None  # class-conditional models only
    null_label: int | None = None  # label of the unconditional branch for CFG (None: no CFG)
    meta: dict = field(default_factory=dict)
    vae: Any = None  # diffusers AutoencoderKL of a pipeline folder's vae/, or None
    vae_dir: Path | None = None
    # a text UNet under calibration: prompt embedding rows (P [+1], L, D) that the integer cond
    # (num_classes = P prompts, null_label = the negative prompt's row) indexes (calibrate.prompts)
    cond_table: Any = None

    def decode(self, latents):
        """Images from the UNet's samples: VAE-decoded for a pipeline with ``vae/``, else as sampled."""
        if self.vae is None:
            return latents
        from saq_deploy.models.vae import VaeDecoder

        return VaeDecoder(self.vae)(latents)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one image: the sample shape, or the VAE's decoded shape for a latent pipeline."""
        if self.vae is None:
            return self.sample_shape
        _, h, w = self.sample_shape
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (int(self.vae.config.out_channels), h * f, w * f)

    @property
    def kind(self) -> str:
        """"class", "text" (cross-attention) or "uncond"."""
        if self.unet.__class__.__name__ == "UNet2DConditionModel":
            return "text"
        return "class" if self.unet.config.get("num_class_embeds") else "uncond"

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    def eps_model(self):
        from saq_deploy.models.eps_model import IndexedCondEpsModel, TorchEpsModel

        model = TorchEpsModel(self.unet)
        return model if self.cond_table is None else IndexedCondEpsModel(model, self.cond_table)

    def schedule(self):
        from saq_deploy.schedules.vp import VPSchedule

        return VPSchedule.from_diffusers(self.scheduler_config)


def builtin_dir(name: str) -> Path:
    from saq_deploy.reference import DIGITS_TEXT_DIR, DIGITS_UNET_DIR

    dirs = {"digits": DIGITS_UNET_DIR, "digits-text": DIGITS_TEXT_DIR}
    if name not in dirs:
        raise ConfigError(f"unknown built-in model 'builtin:{name}'; available: "
                          + ", ".join(f"builtin:{k}" for k in BUILTINS))
    return dirs[name]


def _resolve_unet_dir(path: Path) -> tuple[Path, Path | None]:
    """Return (unet folder, scheduler_config.json or None) for a UNet or pipeline folder."""
    if not path.exists():
        raise ModelLoadError(f"model path '{path}' does not exist; pass builtin:digits or a local "
                             "diffusers UNet/pipeline folder")
    if not path.is_dir():
        raise ModelLoadError(f"model path '{path}' is a file; pass the diffusers folder that holds "
                             "config.json and the weights")
    # a pipeline folder: model_index.json, or (saved part by part, or copied without it) a unet/
    # subfolder with its config; vae/ is read by load_pipeline_vae, text_encoder/ is not read
    is_pipeline = (path / "model_index.json").exists() or (
        not (path / "config.json").exists() and (path / "unet" / "config.json").exists())
    if is_pipeline:
        unet_dir, sched = path / "unet", path / "scheduler" / "scheduler_config.json"
        if not (unet_dir / "config.json").exists():
            raise ModelLoadError(f"pipeline folder '{path}' has no unet/config.json")
        return unet_dir, sched if sched.exists() else None
    if not (path / "config.json").exists():
        raise ModelLoadError(f"'{path}' is not a diffusers model folder (no config.json, unet/config.json "
                             "or model_index.json)")
    for cand in (path / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json"):
        if cand.exists():
            return path, cand
    return path, None


def _load_unet(unet_dir: Path):
    return load_diffusers_model(unet_dir, SUPPORTED_CLASSES, "the UNet")


def load_diffusers_model(model_dir: Path, classes: tuple[str, ...], what: str):
    """A diffusers model folder (config.json + weights) of one of ``classes``, eval mode, float32;
    weights vetted before diffusers reads them and matched to the config key for key."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cls_name = cfg.get("_class_name")
    if cls_name not in classes:
        raise ModelLoadError(f"'{model_dir}' holds a {cls_name or 'non-diffusers'} model; supported: "
                             + ", ".join(classes))
    weights = sorted(model_dir.glob("diffusion_pytorch_model*.safetensors"))
    bins = [] if weights else sorted(model_dir.glob("diffusion_pytorch_model*.bin"))
    if not weights and not bins:
        raise ModelLoadError(f"'{model_dir}' has no diffusion_pytorch_model.safetensors (or .bin) weights")
    for w in weights:  # check the header before diffusers does, for a one-line error
        _check_safetensors(w)
    for b in bins:  # our own check: never depend on a library default to keep pickled code from running
        _check_bin(b)
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    cls = getattr(diffusers, cls_name)
    verbosity = diffusers_logging.get_verbosity()
    # its "newly initialized" warning would precede our refusal below and still read like success
    diffusers_logging.set_verbosity_error()
    try:
        # .bin weights go through torch.load(weights_only=True) inside diffusers
        model, info = cls.from_pretrained(model_dir, use_safetensors=bool(weights), local_files_only=True,
                                          low_cpu_mem_usage=False,  # no accelerate needed
                                          output_loading_info=True)
    except Exception as e:  # diffusers raises many types for broken folders
        raise ModelLoadError(f"could not load {what} from '{model_dir}': {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        diffusers_logging.set_verbosity(verbosity)
    _check_keys(weights or bins, info)
    return model.eval().float()


def _check_keys(files: list[Path], info: dict) -> None:
    """diffusers fills layers whose weights are missing with random values and drops unknown
    weights, with only a log warning: such a model samples noise and exits 0, so refuse it."""
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    if not missing and not unexpected:
        return
    where = f"'{files[0]}'" if len(files) == 1 else f"the {len(files)} weight files in '{files[0].parent}'"
    parts = [f"{len(k)} {what} key(s) ({', '.join(k[:3])}{', ...' if len(k) > 3 else ''})"
             for what, k in (("missing", missing), ("unexpected", unexpected)) if k]
    harm = "layers would be left randomly initialised" if missing else "those weights would be ignored"
    raise ModelLoadError(f"weight file {where} does not match its config.json: {' and '.join(parts)}; "
                         f"{harm}: use the weights saved together with this config.json "
                         "(re-download or re-export the folder)")


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in list(f.keys())[:1]:
                f.get_slice(key)
    except Exception as e:
        raise ModelLoadError(f"weight file '{path}' is not a valid safetensors file ({e}); "
                             "re-download or re-export it") from e


def _check_bin(path: Path) -> None:
    """A pickle-based .bin can run code when unpickled: only tensors may come out of it."""
    import pickle
    import zipfile

    import torch

    try:
        # mmap: reading the tensors' data is not needed to vet the pickle (zip checkpoints only)
        torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise ModelLoadError(f"weight file '{path}' holds pickled Python objects besides tensors; it is not "
                             "loaded (unpickling it could run code): convert it to safetensors") from e
    except Exception as e:
        raise ModelLoadError(f"weight file '{path}' is not a readable PyTorch checkpoint "
                             f"({type(e).__name__}); re-download or re-export it") from e


def resolve_unet_dir(path: Path) -> tuple[Path, Path | None]:
    """Public: (unet folder, scheduler_config.json or None) for a UNet or pipeline folder."""
    return _resolve_unet_dir(path)


def load_model(spec: str | Path) -> LoadedModel:
    """Load ``builtin:NAME`` or a local diffusers folder. Raises ConfigError / ModelLoadError."""
    from saq_deploy.utils.io import sha256_dir

    spec_s = str(spec)
    if spec_s.startswith("builtin:"):
        name = spec_s.split(":", 1)[1]
        unet_dir, sched = _resolve_unet_dir(builtin_dir(name))
    else:
        name = Path(spec_s).name or spec_s
        unet_dir, sched = _resolve_unet_dir(Path(spec_s).expanduser())
    if sched is None:
        raise ModelLoadError(f"no scheduler_config.json beside '{unet_dir}' or in ../scheduler/; the noise "
                             "schedule is needed to sample: copy the pipeline's scheduler config there")
    unet = _load_unet(unet_dir)
    vae, vae_dir = load_pipeline_vae(unet_dir)
    if vae is not None and int(vae.config.latent_channels) != int(unet.config.out_channels):
        raise ModelLoadError(f"'{vae_dir}' decodes {vae.config.latent_channels}-channel latents but the UNet in "
                             f"'{unet_dir}' makes {unet.config.out_channels} channels: this vae/ does not "
                             "belong to this unet/ (fix the pipeline folder)")
    meta_path = unet_dir / MODEL_META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    num_class_embeds = unet.config.get("num_class_embeds")
    num_classes = meta.get("num_classes", num_class_embeds)
    return LoadedModel(
        name=spec_s if spec_s.startswith("builtin:") else name,
        unet=unet,
        scheduler_config=json.loads(sched.read_text()),
        unet_dir=unet_dir,
        source_hash=sha256_dir(unet_dir),
        num_classes=num_classes if num_class_embeds else None,
        null_label=meta.get("null_label") if num_class_embeds else None,
        meta=meta,
        vae=vae,
        vae_dir=vae_dir,
    )


def load_pipeline_vae(unet_dir: Path):
    """(AutoencoderKL, its folder) when ``unet_dir`` is a pipeline's ``unet/`` with a ``vae/`` beside
    it, else (None, None)."""
    from saq_deploy.models.vae import find_vae_dir, load_vae

    if unet_dir.name != "unet":
        return None, None
    vae_dir = find_vae_dir(unet_dir.parent)
    return (None, None) if vae_dir is None else (load_vae(vae_dir), vae_dir)
