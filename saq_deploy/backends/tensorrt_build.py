"""TensorRT build: the ``tensorrt``-target Q/DQ ONNX -> strongly typed network -> plan + audit.

Flow (docs/design/deployment.md §2.1), written to the documented TensorRT 10/11 Python API:
Logger -> ``Builder`` -> network (``STRONGLY_TYPED`` creation flag on 10.x; 11.x is always strongly
typed) -> ``OnnxParser.parse_from_file`` (every parser error reported) -> builder config (workspace
pool limit, optimization level, DETAILED profiling verbosity for the inspector, optional
``VERSION_COMPATIBLE``) -> one optimization profile (min/opt/max from the build profile) -> timing
cache loaded and saved -> ``build_serialized_network`` -> plan. All precision lives in the ONNX
(FP16-typed variant by default); precision builder flags are set only for a network that is not
strongly typed (a TensorRT without the flag). The plan is then deserialized once to read the engine
inspector's layer information for the precision audit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from saq_deploy.backends.tensorrt_runtime import (
    INSTALL_HINT,
    deserialize,
    gpu_info,
    make_logger,
    require_cuda,
    version_tuple,
)
from saq_deploy.backends.trt_profile import BuildProfile, resolve_profile, resolve_shapes
from saq_deploy.errors import BackendUnavailableError, ModelLoadError

PLAN_FILE = "model.plan"
AUDIT_FILE = "audit.json"
ENGINE_INFO_FILE = "engine_info.json"


def typing_plan(version: str, has_strongly_typed_flag: bool, precision: str) -> dict:
    """How to type the network for this TensorRT: ``{"strongly_typed", "creation_flag",
    "builder_flags"}``. 11.x: always strongly typed (the flag is accepted and ignored, so unused);
    10.x: the STRONGLY_TYPED creation flag; older: weak typing with INT8 (+ FP16) builder flags."""
    if version_tuple(version)[:1] >= (11,):
        return {"strongly_typed": True, "creation_flag": False, "builder_flags": []}
    if has_strongly_typed_flag:
        return {"strongly_typed": True, "creation_flag": True, "builder_flags": []}
    return {"strongly_typed": False, "creation_flag": False,
            "builder_flags": ["INT8", *(["FP16"] if precision == "fp16" else [])]}


def require_builder():
    """The full ``tensorrt`` module (Builder + OnnxParser), or BackendUnavailableError."""
    try:
        import tensorrt as trt
    except ImportError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BackendUnavailableError(f"TensorRT is not installed ({first}); {INSTALL_HINT}") from e
    if not hasattr(trt, "Builder") or not hasattr(trt, "OnnxParser"):
        raise BackendUnavailableError(f"this tensorrt module ({getattr(trt, '__version__', '?')}) has no "
                                      f"Builder/OnnxParser; {INSTALL_HINT}")
    return trt


def preflight(profile: BuildProfile | str | Path | None) -> BuildProfile:
    """Cheap checks before any export: the profile parses, TensorRT's builder imports, a GPU exists."""
    prof = resolve_profile(profile)
    require_builder()
    require_cuda()
    return prof


def refuse_lint_errors(src: Path) -> None:
    """Run the TensorRT Q/DQ lint; refuse to build on any error (one line with the rule ids)."""
    from saq_deploy.export.lint import lint_model

    errors = [i for i in lint_model(src, target="tensorrt") if i.severity == "error"]
    if errors:
        rules = ", ".join(sorted({i.rule for i in errors}))
        raise ModelLoadError(f"'{src}' fails the TensorRT Q/DQ lint with {len(errors)} error(s) ({rules}); "
                             f"see: saq-deploy lint {src} --target tensorrt")


def _parse(trt, builder, logger, src: Path, typing: dict):
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typing["creation_flag"] else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    parser_flags = []
    # Plugin-free InstanceNormalization (needed for version-compatible plans; default on 10.x)
    if hasattr(trt, "OnnxParserFlag") and hasattr(trt.OnnxParserFlag, "NATIVE_INSTANCENORM"):
        parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
        parser_flags.append("NATIVE_INSTANCENORM")
    if not parser.parse_from_file(str(src)):
        errs = [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
        raise ModelLoadError(f"TensorRT's ONNX parser rejected '{src}' with {len(errs)} error(s): "
                             + " | ".join(errs or ["(no parser errors recorded; see the TensorRT log)"]))
    return network, parser, parser_flags


def _config(trt, builder, network, prof: BuildProfile, shapes: dict, typing: dict):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, prof.workspace_mib << 20)
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = prof.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for name in typing["builder_flags"]:
        if hasattr(trt.BuilderFlag, name):
            config.set_flag(getattr(trt.BuilderFlag, name))
    if not prof.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if prof.version_compatible:
        if not hasattr(trt.BuilderFlag, "VERSION_COMPATIBLE"):
            raise BackendUnavailableError(f"TensorRT {trt.__version__} cannot build version-compatible plans")
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    have = {network.get_input(i).name for i in range(network.num_inputs)}
    if have != set(shapes):
        raise ModelLoadError(f"the parsed network has inputs {sorted(have)}, the profile shapes {sorted(shapes)}")
    opt = builder.create_optimization_profile()
    for name, s in shapes.items():
        opt.set_shape(name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(opt)
    return config


def _load_timing_cache(config, path: Path | None) -> int:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=True)  # a cache from another GPU/version is ignored
    return len(data)


def _save_timing_cache(config, path: Path | None) -> int:
    from saq_deploy.utils.io import write_bytes_atomic

    if path is None:
        return 0
    data = bytes(memoryview(config.get_timing_cache().serialize()))
    write_bytes_atomic(path, data)
    return len(data)


def build_plan(trt, src: Path, prof: BuildProfile, shapes: dict) -> tuple[bytes, dict]:
    """ONNX file -> serialized plan and what was used to build it."""
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    typing = typing_plan(trt.__version__, hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
                         prof.precision)
    network, parser, parser_flags = _parse(trt, builder, logger, src, typing)
    config = _config(trt, builder, network, prof, shapes, typing)
    cache_path = Path(prof.timing_cache) if prof.timing_cache else None
    loaded = _load_timing_cache(config, cache_path)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        detail = "; ".join(logger.errors[-3:]) or "see the TensorRT log"
        raise ModelLoadError(f"TensorRT could not build an engine from '{src}': {detail}")
    saved = _save_timing_cache(config, cache_path)
    del parser
    flags = {"strongly_typed": typing["strongly_typed"], "strongly_typed_creation_flag": typing["creation_flag"],
             "builder_flags": list(typing["builder_flags"]), "version_compatible": prof.version_compatible,
             "tf32": prof.tf32, "optimization_level": prof.optimization_level,
             "workspace_mib": prof.workspace_mib, "profiling_verbosity": "DETAILED", "parser_flags": parser_flags}
    timing = {"path": str(cache_path) if cache_path else None, "loaded_bytes": loaded, "saved_bytes": saved}
    return bytes(memoryview(plan)), {"flags": flags, "timing_cache": timing, "build_time_s": round(seconds, 3)}


def engine_information(trt, plan: bytes, version_compatible: bool) -> dict:
    """The engine inspector's JSON for the whole engine."""
    _runtime, engine = deserialize(trt, plan, host_code_allowed=version_compatible)
    inspector = engine.create_engine_inspector()
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def _audit_summary(audit: dict) -> dict:
    if not audit.get("detailed"):
        return {"detailed": False}
    share = {k: v["share"] for k, v in audit["compute_precision"].items()}
    return {"detailed": True, "compute_precision_share": share, "reformat_layers": audit["reformat_layers"],
            "unfused_qdq": len(audit["unfused_qdq"])}


def build(export_dir: Path, tmp: Path, em: dict, *, profile: BuildProfile | str | Path | None = None,
          onnx_file: str | Path | None = None) -> tuple[dict, dict, str]:
    """Build into ``tmp``: returns (files -> sha256, the manifest's ``build`` dict, plan file name)."""
    import torch

    from saq_deploy.backends.trt_audit import audit_layers
    from saq_deploy.utils.io import sha256_file, write_json_atomic

    prof = resolve_profile(profile)
    src = Path(onnx_file) if onnx_file else Path(export_dir) / prof.onnx_file
    if not src.is_file():
        raise ModelLoadError(f"ONNX file '{src}' does not exist; re-export with saq-deploy export "
                             "(the FP16-typed variant is model.fp16.onnx)")
    shapes = resolve_shapes(prof, em["inputs"], em["model_meta"])
    refuse_lint_errors(src)
    trt = require_builder()
    gpu = gpu_info()
    t0 = time.perf_counter()
    plan, stats = build_plan(trt, src, prof, shapes)
    (tmp / PLAN_FILE).write_bytes(plan)
    info = engine_information(trt, plan, prof.version_compatible)
    write_json_atomic(tmp / ENGINE_INFO_FILE, info)
    try:
        audit = audit_layers(info)
    except ModelLoadError as e:  # an inspector format this parser does not know: keep the build
        audit = {"error": str(e)}
    write_json_atomic(tmp / AUDIT_FILE, audit)
    files = {f: sha256_file(tmp / f) for f in (PLAN_FILE, AUDIT_FILE, ENGINE_INFO_FILE)}
    bmin, _, bmax = prof.batches
    build_info = {
        "tensorrt": trt.__version__, "gpu": gpu, "cuda": torch.version.cuda,
        "profile": {"name": prof.name, "path": prof.path, "sha256": prof.sha256, "resolved": prof.to_dict()},
        "onnx_file": src.name, "onnx_sha256": sha256_file(src),
        "state_sha256": em.get("calibrated", {}).get("state_sha256"),
        "shapes": shapes, "min_batch": bmin, "max_batch": bmax, **stats,
        "total_time_s": round(time.perf_counter() - t0, 3), "plan_bytes": len(plan),
        "audit": _audit_summary(audit) if "error" not in audit else {"error": audit["error"]},
    }
    return files, build_info, PLAN_FILE
