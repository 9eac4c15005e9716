"""`saq-deploy inspect ENGINE_DIR`: what an engine runs in. TensorRT: the precision audit stored at
build time (layer/weight precision shares, reformats, unfused Q/DQ). ONNX Runtime: the op-type
histogram of the optimized graph (QLinearConv, MatMulIntegerToFloat, ... show what fused)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

EngineArg = Annotated[Path, typer.Argument(help="Engine folder (from saq-deploy build-engine).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the audit / histogram as JSON.")]


def _ort_histogram(path: Path, manifest: dict) -> dict:
    from collections import Counter

    import onnx

    model = onnx.load(str(path / manifest["engine_file"]), load_external_data=False)
    counts = Counter(n.op_type for n in model.graph.node)
    return {"nodes": sum(counts.values()), "op_types": dict(counts.most_common())}


def _trt_audit(path: Path, manifest: dict) -> dict:
    import json

    from saq_deploy.backends.tensorrt import AUDIT_FILE
    from saq_deploy.errors import ModelLoadError

    f = path / AUDIT_FILE
    if not f.is_file():
        raise ModelLoadError(f"'{f}' is missing; rebuild the engine with saq-deploy build-engine")
    return json.loads(f.read_text())


def inspect_cmd(engine: EngineArg, json_out: JsonOpt = False) -> None:
    """Print an engine's precision audit (TensorRT) or optimized op-type histogram (ONNX Runtime)."""
    import json

    from saq_deploy.backends.engine import read_engine_manifest
    from saq_deploy.backends.trt_audit import format_audit

    manifest = read_engine_manifest(engine)
    build = manifest.get("build", {})
    if manifest["backend"] == "tensorrt":
        data = _trt_audit(engine, manifest)
        gpu = build.get("gpu", {})
        head = (f"TensorRT {build.get('tensorrt')} engine for {gpu.get('name')} (sm {gpu.get('compute_capability')}), "
                f"profile {build.get('profile', {}).get('name')}, ONNX {build.get('onnx_file')}")
        body = format_audit(data) if "error" not in data else f"audit unavailable: {data['error']}"
    else:
        data = _ort_histogram(engine, manifest)
        head = (f"ONNX Runtime {build.get('onnxruntime')} engine, optimization level "
                f"{build.get('graph_optimization_level')}, {data['nodes']} nodes")
        body = "\n".join(f"{n:8d}  {op}" for op, n in data["op_types"].items())
    typer.echo(json.dumps(data, indent=2) if json_out else f"{head}\n{body}")
