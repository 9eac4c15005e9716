"""`saq-deploy inspect ENGINE_DIR`: what an engine runs in. TensorRT: the precision audit stored at
build time (layer/weight precision shares, reformats, unfused Q/DQ). ONNX Runtime: the op-type
histogram of the optimized graph (QLinearConv, MatMulIntegerToFloat, ... show what fused).
OpenVINO: the runtime precision of every layer of the compiled model, counted at build time.
Each backend's ``describe`` in saq_deploy.backends.registry says it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

EngineArg = Annotated[Path, typer.Argument(help="Engine folder (from saq-deploy build-engine).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the audit / histogram as JSON.")]


def inspect_cmd(engine: EngineArg, json_out: JsonOpt = False) -> None:
    """Print an engine's precision audit (TensorRT, OpenVINO) or optimized op-type histogram (ONNX Runtime)."""
    import json

    from saq_deploy.backends.engine import read_engine_manifest
    from saq_deploy.backends.grouped import describe_engine
    from saq_deploy.backends.registry import get_backend

    manifest = read_engine_manifest(engine)
    head, body, data = describe_engine(get_backend(manifest["backend"]), engine, manifest)
    typer.echo(json.dumps(data, indent=2) if json_out else f"{head}\n{body}")
