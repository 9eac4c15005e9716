"""Calibration driven by real sampler trajectories (SAQ, docs/design/method.md §2-§3).

``collect_trajectories`` records dual-order FP data from a sampler callback into safetensors
shards; ``TrajectoryDataset`` streams it back. Imports no ONNX Runtime or TensorRT. The names
below load on first use, so ``saq_deploy.calibrate.methods`` / ``.recipe`` (the CLI's choices)
stay free of torch.
"""

import importlib

_LAZY = {
    "PAIRINGS": "dataset", "RECORD_FIELDS": "dataset", "StudentFields": "dataset", "TargetFields": "dataset",
    "TrajectoryDataset": "dataset", "pairing_fields": "dataset",
    "TRAJECTORY_SAMPLERS": "trajectory", "collect_trajectories": "trajectory", "step_direction": "trajectory",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"saq_deploy.calibrate.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'saq_deploy.calibrate' has no attribute {name!r}")
