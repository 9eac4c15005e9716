"""Engines behind the one ``eps(x, t, cond)`` contract: ONNX Runtime (everywhere), OpenVINO (x86
CPUs, optional extra) and TensorRT (NVIDIA GPUs, optional extra), registered in
:mod:`saq_deploy.backends.registry`. Backend modules import their runtime lazily."""

from saq_deploy.backends.build import build_engine
from saq_deploy.backends.engine import Engine, EngineEpsModel, load_engine
from saq_deploy.backends.registry import BACKENDS, Runner, get_backend

__all__ = ["BACKENDS", "Engine", "EngineEpsModel", "Runner", "build_engine", "get_backend", "load_engine"]
