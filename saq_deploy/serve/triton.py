"""``export_triton``: an NVIDIA Triton Inference Server model repository for the UNet engine.

    model_repository/
      <name>/config.pbtxt        inputs / outputs / dtypes / dims, max_batch_size, dynamic_batching
      <name>/1/model.plan        TensorRT engine (backend "tensorrt"), or
      <name>/1/model.onnx        the engine's source Q/DQ ONNX (backend "onnxruntime")
      <name>/saq_engine.json     model metadata the client-side sampler needs (schedule, classes)

Triton serves the UNet (one ``eps(x, t, cond)`` call per request); the sampler loop stays on the
client, which is what makes the HTTP server and Triton interchangeable behind one contract.
For ONNX Runtime the portable Q/DQ export is copied, not the optimized engine graph: the latter
may hold CPU-specific fused layouts tied to the ORT build that wrote it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from saq_deploy.errors import ConfigError, ModelLoadError

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _dims(spec: dict) -> list[int]:
    """Per-item dims (batch dimension dropped); symbolic sizes become -1."""
    shape = list(spec["shape"])[1:]
    return [d if isinstance(d, int) else -1 for d in shape]


def _tensor_block(spec: dict) -> str:
    dtype = TRITON_DTYPES.get(spec["dtype"])
    if dtype is None:
        raise ConfigError(f"tensor '{spec['name']}' has dtype {spec['dtype']}, which this exporter cannot map")
    dims = _dims(spec)
    lines = [f'    name: "{spec["name"]}"', f"    data_type: {dtype}"]
    if dims:
        lines.append(f"    dims: [ {', '.join(map(str, dims))} ]")
    else:  # a (B,) tensor: one element per item, reshaped to a scalar for the model
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    return "  {\n" + "\n".join(lines) + "\n  }"


def _param(key: str, value: str) -> str:
    return f'parameters {{\n  key: "{key}"\n  value: {{ string_value: {json.dumps(value)} }}\n}}'


def config_pbtxt(manifest: dict, *, name: str, max_batch_size: int, max_queue_delay_us: int = 500,
                 instances: int = 1) -> str:
    """The text-format ModelConfig for an engine manifest."""
    from saq_deploy.backends.registry import get_backend

    spec = get_backend(manifest["backend"])
    trt = spec.device == "cuda"
    preferred = sorted({b for b in (1, 2, 4, 8, 16, 32, max_batch_size) if b <= max_batch_size})
    src = manifest.get("source", {})
    meta = manifest.get("model_meta", {})
    out = [
        f'name: "{name}"',
        spec.triton,
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(_tensor_block(s) for s in manifest["inputs"]) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(s) for s in manifest["outputs"]) + "\n]",
        ("dynamic_batching {\n"
         f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
         f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}"),
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {'KIND_GPU' if trt else 'KIND_CPU'}\n  }}\n]",
        _param("saq_state_sha256", src.get("state_sha256", "")),
        _param("saq_method", str(src.get("method", ""))),
        _param("saq_bits", str(src.get("bits", ""))),
        _param("saq_calibrated_for", json.dumps(meta.get("calibrated_for"), sort_keys=True)),
    ]
    return "\n".join(out) + "\n"


def _model_file(artifact: Path, engine_dir: Path, manifest: dict) -> tuple[Path, str]:
    from saq_deploy.backends.grouped import is_grouped
    from saq_deploy.backends.registry import get_backend
    from saq_deploy.utils.io import sha256_file

    if is_grouped(manifest):  # one Triton model runs one graph: K timestep-group engines are not that
        raise ConfigError(f"engine '{engine_dir}' has one engine per timestep group, which export-triton does not "
                          "ship; export with saq-deploy export --timestep-groups collapsed and rebuild the engine")
    if get_backend(manifest["backend"]).triton_ships_engine:  # TensorRT: the plan itself
        return engine_dir / manifest["engine_file"], "model.plan"
    source = manifest["source"]
    src = artifact / "onnx" / source["export_target"] / "model.onnx"
    if not src.exists() or sha256_file(src) != source["onnx_sha256"]:
        raise ModelLoadError(f"the engine's source ONNX '{src}' is missing or changed since the build; "
                             "rebuild the engine with saq-deploy build-engine")
    return src, "model.onnx"


def export_triton(artifact: str | Path, output: str | Path, *, backend: str = "onnxruntime",
                  engine: str | Path | None = None, name: str = "saq_unet", max_batch_size: int | None = None,
                  max_queue_delay_us: int = 500, instances: int = 1, force: bool = False) -> Path:
    """Write ``<output>/<name>/`` for the artifact's engine (hashes verified first)."""
    from saq_deploy.api import verify_artifact
    from saq_deploy.backends.engine import read_engine_manifest, verify_files
    from saq_deploy.backends.registry import REGISTRY, get_backend
    from saq_deploy.utils.io import sha256_file

    if not NAME_RE.match(name):
        raise ConfigError(f"--name '{name}' must be 1-64 characters of letters, digits, '_', '.', '-'")
    spec = get_backend(backend)
    if spec.triton is None:
        names = ", ".join(b.name for b in REGISTRY.values() if b.triton)
        raise ConfigError(f"export-triton writes models for the {names} backends; a {spec.title} engine has "
                          "no Triton model here: build one with --backend onnxruntime")
    artifact = Path(artifact)
    am = verify_artifact(artifact)
    engine_dir = Path(engine) if engine else spec.default_engine_dir(artifact)
    manifest = read_engine_manifest(engine_dir)
    verify_files(engine_dir, manifest)
    if manifest["backend"] != backend:
        raise ConfigError(f"engine '{engine_dir}' was built for {manifest['backend']}, not {backend}")
    if manifest.get("source", {}).get("state_sha256") != am["state_sha256"]:
        raise ModelLoadError(f"engine '{engine_dir}' was built from a different calibration than '{artifact}'")
    src, dest = _model_file(artifact, engine_dir, manifest)
    profile_max = manifest.get("shapes", {}).get("max_batch")
    mbs = max_batch_size or profile_max or 16
    if instances < 1:
        raise ConfigError(f"--instances must be >= 1, got {instances}")
    if mbs < 1 or (profile_max and mbs > profile_max):
        raise ConfigError(f"--max-batch {mbs} must be in 1..{profile_max or 'any'} (the engine profile's maximum)")
    out_root = Path(output)
    target = out_root / name
    if target.exists() and not force:
        raise ConfigError(f"'{target}' exists; pass --force to replace it")
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_root, prefix=f".{name}-"))
    try:
        (tmp / "1").mkdir()
        shutil.copyfile(src, tmp / "1" / dest)
        (tmp / "config.pbtxt").write_text(config_pbtxt(manifest, name=name, max_batch_size=mbs,
                                                       max_queue_delay_us=max_queue_delay_us, instances=instances))
        (tmp / "saq_engine.json").write_text(json.dumps({
            "model_meta": manifest.get("model_meta"), "engine_backend": backend,
            "engine_files": manifest.get("files"), "model_file": dest, "model_sha256": sha256_file(tmp / "1" / dest),
            "source": {k: v for k, v in manifest.get("source", {}).items() if k not in ("onnx", "export_dir")},
        }, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
