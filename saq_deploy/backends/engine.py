"""A built engine folder and the EpsModel over it (the one contract every backend satisfies).

    runs/x/engine/            (ONNX Runtime; TensorRT: engine-tensorrt/model.plan, OpenVINO:
      model.onnx               engine-openvino/model.blob) ONNX Runtime's optimized graph
      manifest.json            backend + version, providers, input shapes, source hashes,
                               model metadata (schedule, classes, sample shape), parity thresholds

``load_engine`` checks the files against the manifest; ``Engine`` looks like a LoadedModel to
``generate`` (``schedule()``, ``sample_shape``, ``num_classes``, ``null_label``, ``eps_model()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saq_deploy.backends.registry import REGISTRY, Runner, get_backend
from saq_deploy.errors import ConfigError, ModelLoadError

MANIFEST_FILE = "manifest.json"
ENGINE_FORMAT = "saq-deploy-engine"


@dataclass
class Engine:
    path: Path
    manifest: dict
    runner: Runner  # OrtRunner / TrtRunner / OvRunner: run(feeds, out_shape) -> Tensor

    @property
    def meta(self) -> dict:
        return self.manifest["model_meta"]

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["sample_shape"])

    @property
    def num_classes(self) -> int | None:
        return self.meta["num_classes"]

    @property
    def null_label(self) -> int | None:
        return self.meta["null_label"]

    @property
    def source_hash(self) -> str:
        return self.meta["source_hash"]

    @property
    def max_batch(self) -> int | None:
        return self.manifest.get("shapes", {}).get("max_batch")

    def schedule(self):
        from saq_deploy.schedules.vp import VPSchedule

        return VPSchedule.from_diffusers(self.meta["scheduler_config"])

    def eps_model(self) -> EngineEpsModel:
        from saq_deploy.models.eps_model import AddedCond

        added = AddedCond.of(self.meta.get("unet_config", {})) if self.kind == "text" else None
        length = next((i["shape"][1] for i in self.manifest.get("inputs", [])
                       if i["name"] == "encoder_hidden_states" and isinstance(i["shape"][1], int)), None)
        return EngineEpsModel(self.runner, self.kind, self.sample_shape, self.max_batch, added, length)

    def close(self) -> None:
        self.runner.close()


class EngineEpsModel:
    """``eps(x, t, cond)`` over an engine runner: checks shapes, splits batches above the
    engine's maximum, keeps the caller's dtype/device. ``added``: an SDXL-class UNet's layout,
    whose packed cond feeds ``encoder_hidden_states``, ``text_embeds`` and ``time_ids``."""

    def __init__(self, runner: Runner, kind: str, sample_shape: tuple[int, ...], max_batch: int | None = None,
                 added=None, text_length: int | None = None):
        self.runner = runner
        self.added = added
        self.text_length = text_length  # L of the exported encoder_hidden_states, when fixed
        self.kind = kind
        self.sample_shape = tuple(sample_shape)
        self.max_batch = max_batch

    def __call__(self, x: Tensor, timestep: Tensor, cond: Tensor | None = None, /) -> Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ConfigError(f"this engine was built for samples of shape {self.sample_shape}, got "
                              f"{tuple(x.shape[1:])}: rebuild the engine for that shape")
        b = x.shape[0]
        # GPU runners (TensorRT) take tensors on their device as they are: no host copies per call
        dev = getattr(self.runner, "device", None) or torch.device("cpu")
        t = timestep.reshape(-1).float().to(dev)
        t = t.expand(b) if t.numel() == 1 else t
        feeds = {"sample": x.detach().float().to(dev), "timestep": t}
        if self.kind == "class":
            if cond is None:
                raise ConfigError("this engine is class-conditional: pass class labels")
            feeds["class_labels"] = cond.reshape(-1).long().to(dev)
        elif self.kind == "text":
            if cond is None:
                raise ConfigError("this engine uses cross-attention: pass encoder hidden states")
            from saq_deploy.models.eps_model import text_kwargs

            if self.added is not None and self.text_length is not None and cond.shape[1] != self.text_length + self.added.rows:
                # unpacking plain (B, L, D) states would read a token row as text_embeds and time_ids
                raise ConfigError(f"this engine is SDXL-class: cond must be ({b}, {self.text_length} + "
                                  f"{self.added.rows}, D) with text_embeds and time_ids packed behind the text "
                                  f"states (models.eps_model.AddedCond.pack), got {tuple(cond.shape)}")
            kw = text_kwargs(cond.detach().float().to(dev), self.added)
            feeds["encoder_hidden_states"] = kw["encoder_hidden_states"]
            feeds.update(kw.get("added_cond_kwargs", {}))
        step = self.max_batch or b
        outs = []
        for s in range(0, b, step):
            part = {k: v[s:s + step] for k, v in feeds.items()}
            outs.append(self.runner.run(part, tuple(part["sample"].shape)))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.to(dtype=x.dtype, device=x.device)


def read_engine_manifest(path: Path) -> dict:
    from saq_deploy.utils.io import check_seal, read_folder_manifest

    mf = Path(path) / MANIFEST_FILE
    manifest = read_folder_manifest(path, MANIFEST_FILE, "an engine folder", "build one with saq-deploy build-engine")
    if manifest.get("artifact") != ENGINE_FORMAT:
        raise ModelLoadError(f"'{mf}' is not a saq-deploy engine manifest")
    check_seal(manifest, mf, "rebuild the engine with saq-deploy build-engine")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    from saq_deploy.utils.io import sha256_file

    for name, digest in manifest.get("files", {}).items():
        f = Path(path) / name
        if not f.exists():
            raise ModelLoadError(f"engine file '{f}' is missing; rebuild with saq-deploy build-engine")
        if sha256_file(f) != digest:
            raise ModelLoadError(f"engine file '{f}' does not match the hash in its manifest: it was modified "
                                 "or is incomplete; rebuild with saq-deploy build-engine")


def load_engine(path: str | Path, *, providers: list[str] | None = None, threads: int | None = None,
                verify: bool = True, force: bool = False) -> Engine:
    """Open an engine folder with the backend its manifest names. ``force``: TensorRT only, run a
    version-compatible plan built by another TensorRT version (see tensorrt_runtime.check_compat)."""
    path = Path(path)
    manifest = read_engine_manifest(path)
    if verify:
        verify_files(path, manifest)
    name = manifest.get("backend")
    if not isinstance(name, str) or name not in REGISTRY:
        raise ModelLoadError(f"engine '{path}' names an unknown backend {name!r}")
    backend = get_backend(name)
    if force and not backend.supports_force:  # refused, not ignored: the user expects it to change something
        raise ConfigError(f"--force applies to TensorRT plans only (version-compatible ones built by another "
                          f"TensorRT version); the engine '{path}' runs on {name}: drop --force")
    from saq_deploy.backends.grouped import check_groups, is_grouped, open_runner

    if is_grouped(manifest):  # one engine per timestep group, each checked like a single one
        check_groups(backend, path, manifest, force=force)
    else:
        backend.check_manifest(path, manifest, force=force)  # this machine can run it, before any load
    runner = open_runner(backend, path, manifest, providers=providers, threads=threads, force=force)
    return Engine(path, manifest, runner)
