"""Importable functions behind the CLI commands (the CLI only parses and prints)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from saq_deploy.errors import ConfigError, ModelLoadError
from saq_deploy.generate import SampleSettings, class_labels, generate, validate_settings


def _load_cond_file(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
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
    return cond, None if uncond is None else uncond.float()[:1]


def load_for_sampling(model_spec: str, artifact: Path | None, engine: Path | None = None, force: bool = False):
    """(LoadedModel-like, eps model, artifact info): the FP model, the fake-quant model of a
    calibrated artifact (which names its own source model), or a built engine."""
    from saq_deploy.models.loading import load_model

    if engine is not None:
        from saq_deploy.backends.engine import load_engine

        eng = load_engine(engine, force=force)
        src = eng.manifest["source"]
        info = {"engine": str(engine), "backend": eng.backend, "state_sha256": src["state_sha256"],
                "method": src["method"], "bits": src["bits"]}
        return eng, eng.eps_model(), info
    if artifact is None:
        loaded = load_model(model_spec)
        return loaded, loaded.eps_model(), None
    from saq_deploy.calibrate.artifact import load_artifact

    q = load_artifact(artifact)
    info = {"path": str(artifact), "state_sha256": q.manifest["state_sha256"],
            "method": q.manifest["method"], "bits": q.manifest["bits"]}
    return q.loaded, q.eps_model(), info


def verify_artifact(artifact: Path) -> dict:
    """The manifest of a calibrated artifact whose files match it (ModelLoadError otherwise);
    reads no model weights. One check for every consumer: ``calibrate.artifact.verify_artifact``."""
    from saq_deploy.calibrate.artifact import verify_artifact as _verify

    return _verify(Path(artifact))


def sample_to_file(model_spec: str, settings: SampleSettings, output: Path, *,
                   cond_file: Path | None = None, artifact: Path | None = None, engine: Path | None = None,
                   progress: bool = False, force: bool = False) -> Path:
    """Sample ``settings.n`` images from a model (or a calibrated artifact's fake-quant model),
    write a grid PNG and ``<output>.json`` manifest."""
    from saq_deploy.utils.images import save_grid
    from saq_deploy.utils.io import check_writable, write_json_atomic
    from saq_deploy.utils.progress import progress as progress_for
    from saq_deploy.utils.versions import package_versions

    validate_settings(settings)  # fail before the (slow) model load
    if force and engine is None:
        raise ConfigError("--force applies to TensorRT engines only: pass it together with --engine DIR")
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise ConfigError(f"--output must end in .png, got '{output}'")
    for path in (output, output.with_suffix(".json")):  # checked before minutes of sampling
        if path.is_dir():
            raise ConfigError(f"cannot write {path}: it is an existing folder; choose another --output")
    check_writable(output)  # a folder we cannot write fails now, not after minutes of sampling
    torch.manual_seed(settings.seed)
    loaded, eps_model, art = load_for_sampling(model_spec, artifact, engine, force=force)
    if loaded.num_classes and settings.label is not None:
        class_labels(1, loaded.num_classes, settings.label)  # a bad --label fails before sampling starts
    cond, null = None, loaded.null_label
    if loaded.kind == "text":
        if cond_file is None:
            raise ConfigError("this UNet uses cross-attention: pass --cond-file with prompt embeddings")
        cond, null = _load_cond_file(Path(cond_file), settings.n)
    t0 = time.perf_counter()
    with progress_for(progress, "sample", transient=True) as bar:
        task = bar.task(f"sampling ({settings.sampler}, {settings.steps} steps)", total=settings.n)
        images, labels = generate(
            eps_model, loaded.schedule(), loaded.sample_shape, settings,
            num_classes=loaded.num_classes, null_label=null, cond=cond,
            on_batch=lambda done: task.update(completed=done),
        )
    wall = time.perf_counter() - t0
    vae_dir, decode = decoder_for(loaded)
    if decode is not None:
        images = decode(images)
    nrow = loaded.num_classes if (settings.label is None and loaded.num_classes) else None
    note = save_grid(images, output, nrow=nrow)
    write_json_atomic(output.with_suffix(".json"), {
        "artifact": "sample-grid",
        "model": loaded.name,
        "model_hash": loaded.source_hash,
        "calibrated_artifact": art,
        "settings": settings.to_dict(),
        "ran": ran_summary(loaded, settings, cond),
        "decoded_by_vae": None if vae_dir is None else str(vae_dir),
        "grid_note": note,
        "labels": None if labels is None else labels.tolist(),
        "wall_time_s": round(wall, 3),
        "versions": package_versions(),
    })
    return output


def ran_summary(loaded, settings: SampleSettings, cond) -> dict:
    """What sampling actually did: guidance only for a conditional model with cfg != 1."""
    conditional = cond is not None or loaded.num_classes is not None
    cfg = settings.cfg if conditional and settings.cfg != 1.0 else None
    why = None
    if not conditional and settings.cfg != 1.0:
        why = "unconditional model: no classifier-free guidance"
    return {"sampler": settings.sampler, "steps": settings.steps, "conditional": conditional,
            "guidance_scale": cfg, "guidance_note": why}


def decoder_for(loaded):
    """(VAE folder, latents -> images) for a model whose pipeline has a ``vae/``, else (None, None).
    An engine finds the VAE in the pipeline folder it was calibrated from, if that is still there."""
    if getattr(loaded, "vae", None) is not None:
        return loaded.vae_dir, loaded.decode
    manifest = getattr(loaded, "manifest", None)
    spec = (manifest or {}).get("source", {}).get("model_spec")
    if not spec or str(spec).startswith("builtin:") or not Path(spec).is_dir():
        return None, None
    from saq_deploy.models.loading import load_pipeline_vae, resolve_unet_dir
    from saq_deploy.models.vae import VaeDecoder

    vae, vae_dir = load_pipeline_vae(resolve_unet_dir(Path(spec))[0])
    return (None, None) if vae is None else (vae_dir, VaeDecoder(vae))


def evaluate_model(model_spec: str, settings: SampleSettings, *, artifact: Path | None = None,
                   progress: bool = False) -> dict:
    """Sample ``settings.n`` digits and compute digit-FID, IS, precision/recall and accuracy.

    Digit metrics need 1x16x16 samples in [-1, 1] (builtin:digits or a model like it); for other
    models use ``saq_deploy.eval.fid`` with your own feature extractor."""
    from saq_deploy.eval.metrics import evaluate_samples
    from saq_deploy.utils.progress import progress as progress_for

    validate_settings(settings)
    loaded, eps_model, art = load_for_sampling(model_spec, artifact)
    if loaded.image_shape != (1, 16, 16) or loaded.kind != "class":
        raise ConfigError("digit metrics need a class-conditional model with 1x16x16 images "
                          f"(this one: {loaded.kind}, {loaded.image_shape}); use saq_deploy.eval.fid "
                          "with a feature extractor for your data")
    t0 = time.perf_counter()
    with progress_for(progress, "evaluate", transient=True) as bar:
        task = bar.task(f"sampling ({settings.sampler}, {settings.steps} steps)", total=settings.n)
        images, labels = generate(eps_model, loaded.schedule(), loaded.sample_shape, settings,
                                  num_classes=loaded.num_classes, null_label=loaded.null_label,
                                  on_batch=lambda done: task.update(completed=done))
    sample_s = time.perf_counter() - t0
    metrics = evaluate_samples(loaded.decode(images), labels)  # a pipeline's VAE decodes latents first
    return {"model": loaded.name, "model_hash": loaded.source_hash, "calibrated_artifact": art, "settings": settings.to_dict(),
            "metrics": metrics, "sampling_wall_time_s": round(sample_s, 2)}
