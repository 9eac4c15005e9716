"""Engines behind the one ``eps(x, t, cond)`` contract: ONNX Runtime (everywhere) and TensorRT
(NVIDIA GPUs, optional extra). Backend modules import their runtime lazily."""

from saq_deploy.backends.build import BACKENDS, build_engine
from saq_deploy.backends.engine import Engine, EngineEpsModel, load_engine

__all__ = ["BACKENDS", "Engine", "EngineEpsModel", "build_engine", "load_engine"]
