"""`saq-deploy serve` (HTTP server over an artifact's engine) and `saq-deploy export-triton`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from saq_deploy.backends.registry import BACKENDS
from saq_deploy.cli.engine import Backend

# the engine backends of the registry, plus torch (the artifact's fake-quant PyTorch model)
ServeBackend = Enum("ServeBackend", {name: name for name in (*BACKENDS, "torch")}, type=str)


ArtifactArg = Annotated[Path, typer.Argument(help="Calibrated artifact folder (saq-deploy calibrate -o).",
                                             exists=True, file_okay=False)]
EngineOpt = Annotated[Path | None, typer.Option("--engine", help="Engine folder (default: the backend's folder "
                                                "in the artifact: engine, engine-tensorrt, engine-openvino).",
                                                exists=True, file_okay=False)]


def serve_cmd(
    artifact: ArtifactArg,
    backend: Annotated[ServeBackend, typer.Option("--backend", help="Engine runtime; torch serves the artifact's "
                                                  "fake-quant PyTorch model.", case_sensitive=False)] = ServeBackend.onnxruntime,
    engine: EngineOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8000,
    api_key_file: Annotated[Path | None, typer.Option("--api-key-file", help="File holding the bearer token "
                                                      "clients must send (Authorization: Bearer <token>).")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Images per engine run (capped by the engine "
                                           "profile).")] = 8,
    queue_size: Annotated[int, typer.Option("--queue-size", help="Queued requests before 429.")] = 64,
    timeout: Annotated[float, typer.Option("--timeout", help="Per-request timeout in seconds (then 504).")] = 60.0,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse (422) sampler/steps outside the calibrated "
                                         "envelope instead of warning.")] = False,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", help="Request body limit (413).")] = 1 << 20,
    max_n: Annotated[int, typer.Option("--max-n", help="Images per request.")] = 16,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Sampling steps per request.")] = 100,
    allow_ungated: Annotated[bool, typer.Option("--allow-ungated", help="DEVELOPMENT ONLY: serve an engine "
                                                "without a passing parity gate (every response carries a "
                                                "warning header).")] = False,
    header_timeout: Annotated[float, typer.Option("--header-timeout", help="Seconds a client has to send its "
                                                  "request line and headers (then 408 and the connection "
                                                  "is closed).")] = 10.0,
    body_timeout: Annotated[float, typer.Option("--body-timeout", help="Seconds a client has to send its request "
                                                "body once the headers are in (then 408 and close).")] = 30.0,
    max_in_flight: Annotated[int, typer.Option("--max-in-flight", help="Requests handled at once before 503 "
                                               "(/healthz and /readyz are exempt).")] = 512,
    threads: Annotated[int | None, typer.Option("--threads", help="ONNX Runtime / OpenVINO CPU threads.")] = None,
    force: Annotated[bool, typer.Option("--force", help="TensorRT only: load a plan built by another TensorRT "
                                        "version. Only for version-compatible plans (build profile "
                                        "version_compatible = true); others are still refused.")] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve generated images over HTTP (POST /v1/generate; /healthz, /readyz, /v1/model, /docs)."""
    from saq_deploy.errors import ConfigError
    from saq_deploy.serve.config import ServeConfig, load_api_key
    from saq_deploy.serve.server import require_serve_extra, run_server

    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"--log-level must be debug, info, warning or error, got '{log_level}'")
    require_serve_extra()
    api_key = None
    if api_key_file is not None:
        api_key, warning = load_api_key(api_key_file)
        if warning:
            typer.echo(f"WARNING: {warning}", err=True)
    config = ServeConfig(max_batch=max_batch, queue_size=queue_size, timeout_s=timeout, strict=strict,
                         max_body_bytes=max_body_bytes, max_n=max_n, max_steps=max_steps,
                         allow_ungated=allow_ungated, header_timeout_s=header_timeout, body_timeout_s=body_timeout,
                         max_in_flight=max_in_flight, api_key=api_key)
    if force and backend.value != "torch":
        from saq_deploy.backends.registry import get_backend

        get_backend(backend.value).check_force(force)
    elif force:
        raise ConfigError("--force applies to TensorRT plans only (--backend tensorrt)")
    run_server(artifact, backend=backend.value, engine=engine, host=host, port=port, config=config,
               threads=threads, log_level=log_level.lower(), force=force, echo=lambda s: typer.echo(s, err=True))


def export_triton_cmd(
    artifact: ArtifactArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Model repository folder.")] = Path("model_repository"),
    backend: Annotated[Backend, typer.Option("--backend", help="Which engine to export.",
                                                   case_sensitive=False)] = Backend.onnxruntime,
    engine: EngineOpt = None,
    name: Annotated[str, typer.Option("--name", help="Triton model name.")] = "saq_unet",
    max_batch: Annotated[int | None, typer.Option("--max-batch", help="max_batch_size (default: the engine "
                                                  "profile's, else 16).")] = None,
    queue_delay_us: Annotated[int, typer.Option("--queue-delay-us", help="dynamic_batching "
                                                "max_queue_delay_microseconds.")] = 500,
    instances: Annotated[int, typer.Option("--instances", help="Model instances (instance_group count).")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model folder.")] = False,
) -> None:
    """Write an NVIDIA Triton model repository (config.pbtxt + model) for the artifact's UNet engine."""
    from saq_deploy.serve.triton import export_triton

    out = export_triton(artifact, output, backend=backend.value, engine=engine, name=name, max_batch_size=max_batch,
                        max_queue_delay_us=queue_delay_us, instances=instances, force=force)
    typer.echo(f"wrote {out} (Triton model '{name}', {backend.value})")
