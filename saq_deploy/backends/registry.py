"""The engine backends, in one place: each is a small object that owns its build, load, manifest
checks and default engine folder. ``build_engine``, ``load_engine``, the CLI choices, ``validate``,
``bench``, ``serve`` and ``prepare`` all dispatch through :func:`get_backend`; nothing else
compares backend names.

A backend's runtime (onnxruntime, tensorrt, openvino) is imported lazily inside its methods, so
this module imports on any machine and ``import saq_deploy`` stays light.

    backend       engine folder (default)      engine file   consumes the placement
    onnxruntime   <artifact>/engine            model.onnx    onnxruntime-cpu
    tensorrt      <artifact>/engine-tensorrt   model.plan    tensorrt (profile's ONNX file)
    openvino      <artifact>/engine-openvino   model.blob    OPENVINO_PLACEMENT (measured)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from saq_deploy.errors import ConfigError

if TYPE_CHECKING:
    import torch

# Which Q/DQ placement OpenVINO compiles (both run at INT8 there): the faster one on the reference
# model at batch 8, measured interleaved (docs/design/deployment.md §6.1).
OPENVINO_PLACEMENT = "tensorrt"


@runtime_checkable
class Runner(Protocol):
    """One opened engine. ``run`` takes the engine inputs (``sample``, ``timestep`` and, when the
    model has them, ``class_labels`` / ``encoder_hidden_states``) as torch tensors and returns eps
    of ``out_shape``; :class:`~saq_deploy.backends.engine.EngineEpsModel` wraps it into the one
    ``eps(x, t, cond) -> eps`` contract. ``close`` releases the runtime's resources. A runner may
    have a ``device`` attribute (GPU runners): inputs are then handed over on that device."""

    def run(self, feeds: dict[str, torch.Tensor], out_shape: tuple[int, ...]) -> torch.Tensor: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Built:
    """What a backend's ``build`` wrote into the temp engine folder."""

    files: dict[str, str]  # file name -> sha256
    build: dict  # the manifest's "build" section
    engine_file: str
    max_batch: int | None = None


class Backend:
    """The parts every backend has. Subclasses set the names and implement ``build`` / ``load``."""

    name: str = ""
    title: str = ""  # for messages: "ONNX Runtime"
    engine_dir_name: str = ""
    device: str = "cpu"  # "cpu" | "cuda": what prepare keys its engine cache on
    distributions: tuple[str, ...] = ()  # pip distributions that provide the runtime
    cache_tag: str = ""  # short runtime name in prepare's cache keys
    supports_force: bool = False  # --force (load a plan from another runtime version)
    takes_profile: bool = False  # --profile (a build-profile TOML)
    triton: str | None = None  # Triton config line, None: export-triton does not take this backend
    triton_ships_engine: bool = False  # Triton gets the engine file (else the source Q/DQ ONNX)

    def export_target(self, artifact_manifest: dict) -> str:
        """The artifact's Q/DQ placement this backend compiles."""
        raise NotImplementedError

    def default_engine_dir(self, artifact: str | Path) -> Path:
        """Where ``build-engine`` writes and ``validate`` / ``bench`` / ``serve`` look by default."""
        return Path(artifact) / self.engine_dir_name

    def preflight(self, *, profile: str | Path | None = None, max_batch: int | None = None) -> Any:
        """Cheap checks before the (slow) export; returns what ``build`` needs (or None)."""
        return None

    def source_onnx(self, export_dir: Path, ctx: Any) -> Path:
        return export_dir / "model.onnx"

    def build(self, src: Path, tmp: Path, export_dir: Path, em: dict, ctx: Any, **opts) -> Built:
        raise NotImplementedError

    def check_manifest(self, path: Path, manifest: dict, *, force: bool = False) -> list[str]:
        """Refuse (ModelLoadError, one line) an engine this machine cannot run; returns notes."""
        return []

    def load(self, path: Path, manifest: dict, *, providers: list[str] | None = None,
             threads: int | None = None, force: bool = False) -> Runner:
        raise NotImplementedError

    def describe(self, path: Path, manifest: dict) -> tuple[str, str, dict]:
        """``saq-deploy inspect``: (headline, body text, JSON data) of what the engine runs in."""
        raise NotImplementedError

    def runtime_version(self, manifest: dict) -> str | None:
        return (manifest.get("build") or {}).get(self.name) or (manifest.get("versions") or {}).get(self.name)

    def check_force(self, force: bool) -> None:
        if force and not self.supports_force:
            raise ConfigError(f"--force applies to TensorRT plans only (--backend tensorrt), not {self.name}")


class OnnxRuntimeBackend(Backend):
    name, title, engine_dir_name = "onnxruntime", "ONNX Runtime", "engine"
    distributions, cache_tag, triton = ("onnxruntime", "onnxruntime-gpu"), "ort", 'backend: "onnxruntime"'

    def export_target(self, artifact_manifest: dict) -> str:
        return "onnxruntime-cpu"

    def build(self, src: Path, tmp: Path, export_dir: Path, em: dict, ctx: Any, *, providers=None,
              opt_level: str = "all", **opts) -> Built:
        from saq_deploy.backends.int8_codes import drop_source, source_for_this_cpu
        from saq_deploy.backends.onnxruntime import optimize_model
        from saq_deploy.utils.io import sha256_file

        graph, codes = source_for_this_cpu(src, tmp)
        try:
            build = optimize_model(graph, tmp / "model.onnx", opt_level=opt_level, providers=providers,
                                   disabled_optimizers=tuple(em.get("ort_disabled_optimizers", ())), shown=src)
        finally:
            drop_source(tmp)
        return Built({"model.onnx": sha256_file(tmp / "model.onnx")}, {**build, **codes}, "model.onnx")

    def check_manifest(self, path: Path, manifest: dict, *, force: bool = False) -> list[str]:
        from saq_deploy.backends.int8_codes import check_codes

        check_codes(path, manifest.get("build") or {}, self.title)
        return []

    def load(self, path: Path, manifest: dict, *, providers=None, threads=None, force=False) -> Runner:
        from saq_deploy.backends.onnxruntime import OrtRunner

        build = manifest["build"]
        return OrtRunner(Path(path) / manifest["engine_file"], providers=providers or build["providers"],
                         threads=threads, opt_level="disable",
                         nbits_accuracy=build.get("matmulnbits_accuracy_level", 0))


    def describe(self, path: Path, manifest: dict) -> tuple[str, str, dict]:
        from collections import Counter

        import onnx

        model = onnx.load(str(Path(path) / manifest["engine_file"]), load_external_data=False)
        counts = Counter(n.op_type for n in model.graph.node)
        data = {"nodes": sum(counts.values()), "op_types": dict(counts.most_common())}
        build = manifest.get("build", {})
        head = (f"ONNX Runtime {build.get('onnxruntime')} engine, optimization level "
                f"{build.get('graph_optimization_level')}, {data['nodes']} nodes")
        return head, "\n".join(f"{n:8d}  {op}" for op, n in data["op_types"].items()), data


class TensorRTBackend(Backend):
    name, title, engine_dir_name, device = "tensorrt", "TensorRT", "engine-tensorrt", "cuda"
    distributions, cache_tag = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"), "trt"
    supports_force, takes_profile, triton, triton_ships_engine = True, True, 'platform: "tensorrt_plan"', True

    def export_target(self, artifact_manifest: dict) -> str:
        return "tensorrt"

    def preflight(self, *, profile=None, max_batch=None):
        from saq_deploy.backends import tensorrt as trt_backend

        prof = trt_backend.preflight(profile)  # profile, TensorRT and GPU checked before any export
        if max_batch is not None and max_batch > prof.batches[2]:
            raise ConfigError(f"--max-batch {max_batch} exceeds the build profile's maximum engine batch "
                              f"{prof.batches[2]} (batch.max, doubled when cfg = true)")
        return prof

    def source_onnx(self, export_dir: Path, ctx: Any) -> Path:
        return export_dir / ctx.onnx_file

    def build(self, src: Path, tmp: Path, export_dir: Path, em: dict, ctx: Any, **opts) -> Built:
        from saq_deploy.backends import tensorrt as trt_backend

        files, build, engine_file = trt_backend.build(export_dir, tmp, em, profile=ctx, onnx_file=src)
        return Built(files, build, engine_file, build["max_batch"])

    def load(self, path: Path, manifest: dict, *, providers=None, threads=None, force=False) -> Runner:
        from saq_deploy.backends import tensorrt as trt_backend

        return trt_backend.load_runner(path, manifest, force=force)  # checks version and GPU first

    def describe(self, path: Path, manifest: dict) -> tuple[str, str, dict]:
        import json

        from saq_deploy.backends.tensorrt import AUDIT_FILE
        from saq_deploy.backends.trt_audit import format_audit
        from saq_deploy.errors import ModelLoadError

        f = Path(path) / AUDIT_FILE
        if not f.is_file():
            raise ModelLoadError(f"'{f}' is missing; rebuild the engine with saq-deploy build-engine")
        data = json.loads(f.read_text())
        build = manifest.get("build", {})
        gpu = build.get("gpu", {})
        head = (f"TensorRT {build.get('tensorrt')} engine for {gpu.get('name')} (sm {gpu.get('compute_capability')}), "
                f"profile {build.get('profile', {}).get('name')}, ONNX {build.get('onnx_file')}")
        body = format_audit(data) if "error" not in data else f"audit unavailable: {data['error']}"
        return head, body, data


class OpenVINOBackend(Backend):
    name, title, engine_dir_name = "openvino", "OpenVINO", "engine-openvino"
    distributions, cache_tag = ("openvino",), "ov"

    def export_target(self, artifact_manifest: dict) -> str:
        from saq_deploy.export.api import has_4bit_activations

        # 4-bit activations have no TensorRT placement: the onnxruntime-cpu one is the only export
        return "onnxruntime-cpu" if has_4bit_activations(artifact_manifest) else OPENVINO_PLACEMENT

    def preflight(self, *, profile=None, max_batch=None):
        from saq_deploy.backends.openvino import require_openvino

        require_openvino()  # the missing package is named before a (slow) export

    def build(self, src: Path, tmp: Path, export_dir: Path, em: dict, ctx: Any, *, threads=None,
              **opts) -> Built:
        from saq_deploy.backends.openvino import compile_blob

        # an --onnx file from elsewhere may hold any placement: say so instead of guessing
        own = Path(src).resolve().parent == Path(export_dir).resolve()
        placement = em["target"] if own else f"--onnx {Path(src).name} (not the artifact's export)"
        from saq_deploy.backends.int8_codes import drop_source, source_for_this_cpu

        graph, codes = source_for_this_cpu(src, tmp)
        try:
            files, build, engine_file = compile_blob(graph, tmp, placement, threads=threads, shown=src)
        finally:
            drop_source(tmp)
        return Built(files, {**build, **codes}, engine_file)

    def check_manifest(self, path: Path, manifest: dict, *, force: bool = False) -> list[str]:
        from saq_deploy.backends.int8_codes import check_codes
        from saq_deploy.backends.openvino import check_compat

        check_compat(path, manifest.get("build") or {})
        check_codes(path, manifest.get("build") or {}, self.title)
        return []

    def load(self, path: Path, manifest: dict, *, providers=None, threads=None, force=False) -> Runner:
        from saq_deploy.backends.openvino import OvRunner

        return OvRunner(Path(path) / manifest["engine_file"], manifest.get("build") or {}, threads=threads)

    def describe(self, path: Path, manifest: dict) -> tuple[str, str, dict]:
        build = manifest.get("build", {})
        data = build.get("precisions", {})
        lay, comp = data.get("layers", {}), data.get("compute_layers", {})
        head = (f"OpenVINO {build.get('openvino')} engine for {(build.get('cpu') or {}).get('model')}, "
                f"placement {build.get('placement')}, precision hint {build.get('inference_precision_hint')}: "
                f"compute layers {comp.get('int8')} INT8 / {comp.get('int4', 0)} INT4 / {comp.get('fp32')} FP32, "
                f"all layers {lay.get('int8')} INT8 / {lay.get('fp32')} FP32")
        rows = [f"{sum(c.values()):8d}  {kind}  " + ", ".join(f"{p} {n}" for p, n in c.items())
                for kind, c in sorted(data.get("by_type", {}).items(), key=lambda kv: -sum(kv[1].values()))]
        return head, "\n".join(rows), data


REGISTRY: dict[str, Backend] = {b.name: b for b in (OnnxRuntimeBackend(), TensorRTBackend(), OpenVINOBackend())}
BACKENDS: tuple[str, ...] = tuple(REGISTRY)


def get_backend(name: str) -> Backend:
    """The registered backend ``name``; one ConfigError line naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown backend '{name}'; choose one of {', '.join(BACKENDS)}") from None


def default_engine_dir(artifact: str | Path, backend: str) -> Path:
    """The one default engine folder of ``backend`` for ``artifact`` (build-engine, validate,
    bench, serve, prepare and export-triton all use it)."""
    return get_backend(backend).default_engine_dir(artifact)
