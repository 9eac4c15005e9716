"""Shared fixtures and marker auto-skips. GPU / TensorRT tests skip with a reason where absent."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _has_tensorrt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 -- a broken install fails in many ways; either way: no TensorRT
        return False
    return True


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    skip_trt = pytest.mark.skip(reason="needs the TensorRT builder (`import tensorrt`) and a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not _has_cuda():
            item.add_marker(skip_gpu)
        if "trt" in item.keywords and not (_has_cuda() and _has_tensorrt()):
            item.add_marker(skip_trt)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
