"""What the server serves: one model (engine or fake-quant PyTorch), its parity-gate state, and
the batched generation the worker thread runs.

``load_served`` refuses (ModelLoadError) an artifact or engine whose files do not match their
manifests, and an engine built from a different calibration. An engine without a passing,
current parity gate still loads, but ``ServedModel.gate.passed`` is False: the app reports
not-ready and refuses to generate unless the operator explicitly allows ungated serving.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saq_deploy.backends.registry import BACKENDS, get_backend
from saq_deploy.errors import ConfigError, ModelLoadError
from saq_deploy.serve.text import NO_PROMPTS, PromptSupport, load_prompt_support

SERVE_BACKENDS = (*BACKENDS, "torch")  # torch: the artifact's fake-quant PyTorch model, no engine
GATE_FILE = "parity.json"


@dataclass(frozen=True)
class Gate:
    """The parity gate as the server sees it."""

    required: bool
    passed: bool
    reason: str
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GenSpec:
    """One request's sampling work: everything the worker needs, already as tensors."""

    sampler: str
    steps: int
    cfg: float
    spacing: str | None
    x_T: torch.Tensor  # (n, C, H, W)
    cond: torch.Tensor | None = None  # (n,) labels or (n, L, D) embeddings
    null: torch.Tensor | None = None  # (L, D) negative embedding (cross-attention models with CFG)

    @property
    def n(self) -> int:
        return self.x_T.shape[0]

    def key(self) -> tuple:
        """Requests with equal keys can share one sampler run."""
        tokens = None if self.cond is None or self.cond.ndim < 3 else tuple(self.cond.shape[1:])
        return (self.sampler, self.steps, self.cfg, self.spacing, tokens)


@dataclass
class ServedModel:
    eps_model: Callable
    schedule: object
    sample_shape: tuple[int, ...]
    kind: str  # "class" | "text" | "uncond"
    backend: str
    num_classes: int | None = None
    null_label: int | None = None
    engine_max_batch: int | None = None  # UNet rows per engine call (profile max), None: any
    cond_tokens: int | None = None  # cross-attention: fixed sequence length, None: any
    cond_dim: int | None = None  # cross-attention: embedding width
    calibrated_for: dict | None = None
    gate: Gate = field(default_factory=lambda: Gate(False, True, "no gate needed"))
    info: dict = field(default_factory=dict)
    prompts: PromptSupport = NO_PROMPTS  # cross-attention models: whether requests may send text
    decode: Callable | None = None  # the pipeline's VAE decode (latents -> images), None: samples are images

    def capacity(self, cfg: float, max_batch: int) -> int:
        """Images per engine run for requests at guidance ``cfg`` (CFG doubles the UNet rows)."""
        rows = 2 if (self.kind != "uncond" and cfg != 1.0) else 1
        cap = max_batch if self.engine_max_batch is None else min(max_batch, self.engine_max_batch // rows)
        return max(1, cap)

    def run(self, specs: Sequence[GenSpec], batch_size: int) -> list[torch.Tensor]:
        """Sample all ``specs`` (same key) in one sampler run; images in [-1, 1], one tensor each."""
        from saq_deploy.generate import SampleSettings, generate

        first = specs[0]
        x_T = torch.cat([s.x_T for s in specs])
        cond = None if first.cond is None else torch.cat([s.cond for s in specs])
        null: int | torch.Tensor | None = self.null_label
        if self.kind == "text" and first.null is not None:
            if len(specs) == 1:
                null = first.null
            else:  # one row per image; the whole batch runs as one chunk (total <= capacity)
                null = torch.cat([s.null.expand(s.n, -1, -1) for s in specs])
                batch_size = x_T.shape[0]
        settings = SampleSettings(sampler=first.sampler, steps=first.steps, cfg=first.cfg, n=x_T.shape[0],
                                  spacing=first.spacing, batch_size=batch_size)
        with torch.inference_mode():
            images, _ = generate(self.eps_model, self.schedule, self.sample_shape, settings,
                                 num_classes=self.num_classes, null_label=null, cond=cond, x_T=x_T)
            if self.decode is not None:  # a latent pipeline: clients get images, not latents
                images = self.decode(images)
        return list(images.clamp(-1, 1).split([s.n for s in specs]))


def check_gate(engine_dir: Path, manifest: dict) -> Gate:
    """Read ``<engine>/parity.json`` (written by ``saq-deploy validate``): passed, and for exactly
    the engine files that are there now."""
    f = Path(engine_dir) / GATE_FILE
    hint = "run saq-deploy validate on this engine"
    if not f.exists():
        return Gate(True, False, f"the engine has no parity gate result ({GATE_FILE}): {hint}")
    try:
        gate = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return Gate(True, False, f"{GATE_FILE} cannot be read ({e}): {hint}")
    if not isinstance(gate, dict):
        return Gate(True, False, f"{GATE_FILE} is not a JSON object: {hint}")
    detail = {k: gate.get(k) for k in ("thresholds", "metrics", "validated_at")}
    if gate.get("passed") is not True:
        return Gate(True, False, "the engine FAILED its parity gate against the fake-quant model: "
                    "do not serve it; rebuild or recalibrate", detail)
    if gate.get("engine_files") != manifest.get("files"):
        return Gate(True, False, f"stale parity gate: {GATE_FILE} was written for other engine files "
                    f"than the ones there now; {hint}", detail)
    return Gate(True, True, "parity gate passed for these engine files", detail)


def default_engine_dir(artifact: Path, backend: str) -> Path:
    return get_backend(backend).default_engine_dir(artifact)


def load_served(artifact: str | Path, backend: str = "onnxruntime", *, engine: str | Path | None = None,
                threads: int | None = None, force: bool = False) -> ServedModel:
    """Load what ``saq-deploy serve`` serves; refuses mismatched hashes (ModelLoadError).

    ``force``: load a TensorRT plan built by another TensorRT version (only plans built
    version-compatible can run; the runtime refuses others without it).
    """
    from saq_deploy.api import verify_artifact

    if backend not in SERVE_BACKENDS:
        raise ConfigError(f"unknown backend '{backend}'; choose one of {', '.join(SERVE_BACKENDS)}")
    artifact = Path(artifact)
    am = verify_artifact(artifact)
    if backend == "torch":
        if engine is not None:
            raise ConfigError(f"--engine applies to the engine backends ({', '.join(BACKENDS)}), not torch")
        return _load_torch(artifact, am)
    from saq_deploy.backends import load_engine

    engine_dir = Path(engine) if engine else default_engine_dir(artifact, backend)
    eng = load_engine(engine_dir, threads=threads, force=force)
    if eng.backend != backend:
        raise ConfigError(f"engine '{engine_dir}' was built for {eng.backend}, not {backend}; pass "
                          f"--backend {eng.backend} or the right --engine")
    if eng.manifest.get("source", {}).get("state_sha256") != am["state_sha256"]:
        raise ModelLoadError(f"engine '{engine_dir}' was built from a different calibration than '{artifact}' "
                             "(state hash mismatch); rebuild it with saq-deploy build-engine")
    cond_tokens, cond_dim = _engine_cond_shape(eng.manifest)
    info = _info(eng.meta, am, backend, get_backend(backend).runtime_version(eng.manifest))
    info["engine"].update(max_batch=eng.max_batch, files=dict(eng.manifest.get("files", {})))
    prompts = _prompt_support(eng, cond_tokens, cond_dim)
    decode = _decoder(eng, info)
    return ServedModel(eng.eps_model(), eng.schedule(), eng.sample_shape, eng.kind, backend,
                       num_classes=eng.num_classes, null_label=eng.null_label, engine_max_batch=eng.max_batch,
                       cond_tokens=cond_tokens, cond_dim=cond_dim, calibrated_for=eng.meta.get("calibrated_for"),
                       gate=check_gate(engine_dir, eng.manifest), info=info, prompts=prompts, decode=decode)


def _load_torch(artifact: Path, am: dict) -> ServedModel:
    from saq_deploy.api import load_for_sampling

    loaded, eps_model, _ = load_for_sampling(am["model"]["spec"], artifact)
    return from_loaded(loaded, eps_model, backend="torch", artifact_manifest=am)


def from_loaded(loaded, eps_model: Callable, *, backend: str = "torch", artifact_manifest: dict | None = None,
                gate: Gate | None = None) -> ServedModel:
    """A ServedModel over a LoadedModel (PyTorch): the ``torch`` backend, and tests."""
    am = artifact_manifest or {}
    meta = {"name": loaded.name, "kind": loaded.kind, "sample_shape": list(loaded.sample_shape),
            "num_classes": loaded.num_classes, "null_label": loaded.null_label,
            "source_hash": loaded.source_hash, "calibrated_for": am.get("calibrated_for")}
    cond_dim = loaded.unet.config.get("cross_attention_dim") if loaded.kind == "text" else None
    gate = gate or Gate(False, True, "torch backend: the artifact's fake-quant model (no engine, no gate)")
    info = _info(meta, am, backend, torch.__version__)
    return ServedModel(eps_model, loaded.schedule(), tuple(loaded.sample_shape), loaded.kind, backend,
                       num_classes=loaded.num_classes, null_label=loaded.null_label, cond_dim=cond_dim,
                       calibrated_for=am.get("calibrated_for"), gate=gate, info=info,
                       prompts=_prompt_support(loaded, None, cond_dim), decode=_decoder(loaded, info))


def _prompt_support(model, cond_tokens: int | None, cond_dim: int | None) -> PromptSupport:
    """Load the text encoder now, once, not per request (a LoadedModel or an Engine)."""
    if model.kind != "text":
        return NO_PROMPTS
    from saq_deploy.models.eps_model import default_time_ids
    from saq_deploy.prompt_inputs import source_spec

    return load_prompt_support(source_spec(model), cond_tokens=cond_tokens, cond_dim=cond_dim,
                               time_ids=default_time_ids(model))


def _decoder(model, info: dict) -> Callable | None:
    """The VAE decode of the model's pipeline (found as ``sample`` finds it); records the image shape."""
    from saq_deploy.api import decoder_for

    _, decode = decoder_for(model)
    shape = list(model.sample_shape)
    if decode is not None:
        vae = getattr(model, "vae", None)
        vae = decode.vae if vae is None else vae  # an engine's decode is a VaeDecoder; a LoadedModel has .vae
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        shape = [int(vae.config.out_channels), shape[-2] * f, shape[-1] * f]
    info["model"].update(decoded_by_vae=decode is not None, image_shape=shape)
    return decode


def _engine_cond_shape(manifest: dict) -> tuple[int | None, int | None]:
    for spec in manifest.get("inputs", []):
        if spec.get("name") == "encoder_hidden_states":
            shape = spec.get("shape", [])
            tokens, dim = (shape[1], shape[2]) if len(shape) == 3 else (None, None)
            return (tokens if isinstance(tokens, int) else None), (dim if isinstance(dim, int) else None)
    return None, None


def _info(meta: dict, am: dict, backend: str, runtime_version: str | None) -> dict:
    """/v1/model content. Names and hashes only: no filesystem paths."""
    return {
        "model": {k: meta.get(k) for k in ("name", "kind", "sample_shape", "num_classes", "null_label",
                                           "source_hash")},
        "calibration": {"method": am.get("method", meta.get("method")), "bits": am.get("bits", meta.get("bits")),
                        "calibrated_for": meta.get("calibrated_for") or am.get("calibrated_for"),
                        "state_sha256": am.get("state_sha256")},
        "engine": {"backend": backend, "runtime": backend, "runtime_version": runtime_version},
    }
