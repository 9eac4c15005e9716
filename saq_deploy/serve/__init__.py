"""HTTP serving of a calibrated artifact's engine (or its fake-quant PyTorch model).

FastAPI and uvicorn (the ``serve`` extra) are imported only by ``create_app`` / ``run_server``,
so importing this package stays light.

    from saq_deploy.serve import ServeConfig, create_app, load_served
    app = create_app(load_served("runs/x", "onnxruntime"), ServeConfig(max_batch=8))
"""

from __future__ import annotations

from typing import Any

from saq_deploy.serve.config import ServeConfig
from saq_deploy.serve.model import Gate, ServedModel, check_gate, load_served

__all__ = ["Gate", "ServeConfig", "ServedModel", "check_gate", "create_app", "load_served", "run_server"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from saq_deploy.serve.app import create_app

        return create_app
    if name == "run_server":
        from saq_deploy.serve.server import run_server

        return run_server
    raise AttributeError(f"module 'saq_deploy.serve' has no attribute {name!r}")
