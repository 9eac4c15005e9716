"""Calibration driven by real sampler trajectories (SAQ, docs/design/method.md §2-§3).

``collect_trajectories`` records dual-order FP data from a sampler callback into safetensors
shards; ``TrajectoryDataset`` streams it back. Imports no ONNX Runtime or TensorRT.
"""

from saq_deploy.calibrate.dataset import (
    PAIRINGS,
    RECORD_FIELDS,
    StudentFields,
    TargetFields,
    TrajectoryDataset,
    pairing_fields,
)
from saq_deploy.calibrate.trajectory import TRAJECTORY_SAMPLERS, collect_trajectories, step_direction

__all__ = [
    "PAIRINGS",
    "RECORD_FIELDS",
    "TRAJECTORY_SAMPLERS",
    "StudentFields",
    "TargetFields",
    "TrajectoryDataset",
    "collect_trajectories",
    "pairing_fields",
    "step_direction",
]
