"""Importable functions behind the CLI commands (the CLI only parses and prints)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from saq_deploy.errors import ConfigError
from saq_deploy.generate import SampleSettings, class_labels, generate, validate_settings


def load_for_sampling(model_spec: str, artifact: Path | None, engine: Path | None = None, force: bool = False):
    """(LoadedModel-like, eps model, artifact info): the FP model, the fake-quant model of a
    calibrated artifact (which names its own source model), or a built engine."""
    return _load(model_spec, artifact, engine, force)[:3]


def _load(model_spec: str, artifact: Path | None, engine: Path | None, force: bool):
    """load_for_sampling's three, and the CalibratedModel (its stored prompts) or None."""
    from saq_deploy.models.loading import load_model

    if engine is not None:
        from saq_deploy.backends.engine import load_engine

        eng = load_engine(engine, force=force)
        src = eng.manifest["source"]
        info = {"engine": str(engine), "backend": eng.backend, "state_sha256": src["state_sha256"],
                "method": src["method"], "bits": src["bits"]}
        return eng, eng.eps_model(), info, None
    if artifact is None:
        loaded = load_model(model_spec)
        return loaded, loaded.eps_model(), None, None
    from saq_deploy.calibrate.artifact import load_artifact

    q = load_artifact(artifact)
    info = {"path": str(artifact), "state_sha256": q.manifest["state_sha256"],
            "method": q.manifest["method"], "bits": q.manifest["bits"]}
    return q.loaded, q.eps_model(), info, q


def verify_artifact(artifact: Path) -> dict:
    """The manifest of a calibrated artifact whose files match it (ModelLoadError otherwise);
    reads no model weights. One check for every consumer: ``calibrate.artifact.verify_artifact``."""
    from saq_deploy.calibrate.artifact import verify_artifact as _verify

    return _verify(Path(artifact))


def sample_to_file(model_spec: str, settings: SampleSettings, output: Path, *,
                   cond_file: Path | None = None, artifact: Path | None = None, engine: Path | None = None,
                   prompts: list[str] | None = None, negative_prompt: str | None = None,
                   progress: bool = False, force: bool = False) -> Path:
    """Sample ``settings.n`` images from a model (or a calibrated artifact's fake-quant model, or an
    engine), write a grid PNG and ``<output>.json`` manifest. Text-to-image UNets take ``prompts``
    (through the pipeline's text encoder), ``cond_file`` embeddings, or their stored/default prompts
    (``prompt_inputs``)."""
    from saq_deploy.prompt_inputs import prompt_inputs
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
    loaded, eps_model, art, calibrated = _load(model_spec, artifact, engine, force)
    if loaded.num_classes and settings.label is not None:
        class_labels(1, loaded.num_classes, settings.label)  # a bad --label fails before sampling starts
    if loaded.kind == "text" and settings.label is not None:
        raise ConfigError("--label applies to class-conditional models; this one takes --prompt")
    inputs = prompt_inputs(loaded, settings.n, prompts=prompts, negative_prompt=negative_prompt,
                           cond_file=cond_file, calibrated=calibrated)
    for w in inputs.warnings:
        print(f"warning: {w}", file=sys.stderr)
    cond, null = inputs.cond, inputs.null
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
    nrow = loaded.num_classes if (settings.label is None and loaded.num_classes) else inputs.columns
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
        "prompts": inputs.prompts, "negative_prompt": negative_prompt if inputs.prompts else None,
        "conditioning": inputs.source,
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

    Digit metrics need 1x16x16 samples in [-1, 1]: builtin:digits (accuracy = the classifier agrees
    with the class asked for) or builtin:digits-text (balanced prompts "a bold seven", "a thin 3":
    prompt_accuracy = the digit named, attribute_accuracy = the stroke weight named, measured on the
    image by the rule that labelled the training data). For other models use ``saq_deploy.eval.fid``
    with your own feature extractor."""
    from saq_deploy.utils.progress import progress as progress_for

    validate_settings(settings)
    loaded, eps_model, art = load_for_sampling(model_spec, artifact)
    thresholds = loaded.meta.get("ink_thresholds") if loaded.kind == "text" else None
    if loaded.image_shape != (1, 16, 16) or (loaded.kind != "class" and thresholds is None):
        raise ConfigError("digit metrics need builtin:digits, builtin:digits-text or a model like them with 1x16x16 "
                          f"images (this one: {loaded.kind}, {loaded.image_shape}); use saq_deploy.eval.fid "
                          "with a feature extractor for your data")
    cond = null = prompts = attrs = None
    if thresholds is not None:
        from saq_deploy.models.text_encoder import TextEncoder, pipeline_root
        from saq_deploy.prompt_inputs import source_spec
        from saq_deploy.reference.text_data import eval_prompts

        prompts, index, digits, attrs = eval_prompts(settings.n)
        table = TextEncoder(pipeline_root(source_spec(loaded))).table(prompts, "")
        cond, null = table[index], table[len(prompts):]
    # under torchrun each rank samples whole batches of the one-process run (docs/design/distributed.md §3)
    from dataclasses import replace

    from saq_deploy.eval.sharded import evaluate_sharded, gather_rows, sample_rows
    from saq_deploy.generate import initial_noise

    rows = sample_rows(settings.n, settings.batch_size)
    sl = slice(rows.start, rows.stop)
    labels = None if cond is not None else class_labels(settings.n, loaded.num_classes, settings.label)
    x_T = initial_noise(tuple(loaded.sample_shape), settings.n, settings.seed)[sl]
    t0 = time.perf_counter()
    images = x_T[:0]
    with progress_for(progress, "evaluate", transient=True) as bar:
        task = bar.task(f"sampling ({settings.sampler}, {settings.steps} steps)", total=len(rows))
        if len(rows):
            images, _ = generate(eps_model, loaded.schedule(), loaded.sample_shape, replace(settings, n=len(rows)),
                                 num_classes=loaded.num_classes,
                                 null_label=loaded.null_label if cond is None else null,
                                 cond=(labels if cond is None else cond)[sl], x_T=x_T,
                                 on_batch=lambda done: task.update(completed=done))
    sample_s = time.perf_counter() - t0
    images = loaded.decode(images) if len(rows) else images  # a pipeline's VAE decodes latents first
    if thresholds is None:
        metrics = evaluate_sharded(images, labels[sl])
    else:
        from saq_deploy.reference.text_data import attribute_of

        metrics = evaluate_sharded(images, digits[sl])
        metrics["prompt_accuracy"] = metrics.pop("accuracy")
        hits = gather_rows((attribute_of(images, digits[sl], thresholds) == attrs[sl]).float())
        metrics["attribute_accuracy"] = float(hits.mean())
    return {"model": loaded.name, "model_hash": loaded.source_hash, "calibrated_artifact": art,
            "settings": settings.to_dict(), "prompts": prompts, "metrics": metrics,
            "sampling_wall_time_s": round(sample_s, 2)}
