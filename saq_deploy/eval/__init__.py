"""Metrics for judging diffusion samples: digit FID (or Inception FID for real models), inception
score, k-NN precision/recall, class accuracy, and PSNR/MSE against an FP reference.

Imports are light: only numpy is imported up front; torch-based submodules load on first attribute
access. This package never imports onnxruntime or tensorrt, and never downloads anything.

`train_classifier` is deliberately not re-exported here because a submodule has that name; use
`saq_deploy.eval.classifier.train_classifier` (or `train_and_save`, which also writes the artifacts)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "DigitClassifier",
    "DigitFeatures",
    "FIDStats",
    "FeatureExtractor",
    "InceptionFeatures",
    "class_accuracy",
    "compute_stats",
    "evaluate_samples",
    "fid",
    "frechet_distance",
    "inception_score",
    "load_classifier",
    "mse",
    "precision_recall",
    "psnr",
    "save_classifier",
    "train_and_save",
]

_WHERE = {
    "DigitClassifier": "classifier",
    "load_classifier": "classifier",
    "save_classifier": "classifier",
    "DigitFeatures": "features",
    "FeatureExtractor": "features",
    "InceptionFeatures": "features",
    "class_accuracy": "metrics",
    "evaluate_samples": "metrics",
    "inception_score": "metrics",
    "mse": "metrics",
    "precision_recall": "metrics",
    "psnr": "metrics",
    "train_and_save": "train_classifier",
}

# Imported eagerly (numpy only) so that the name `fid` is the function, not the submodule of the same
# name: importing `saq_deploy.eval.fid` later cannot rebind it once the submodule is loaded. Use
# `from saq_deploy.eval.fid import ...` to reach the module's contents.
from saq_deploy.eval.fid import FIDStats, compute_stats, fid, frechet_distance

if TYPE_CHECKING:
    from saq_deploy.eval.classifier import DigitClassifier, load_classifier, save_classifier
    from saq_deploy.eval.features import DigitFeatures, FeatureExtractor, InceptionFeatures
    from saq_deploy.eval.metrics import (
        class_accuracy,
        evaluate_samples,
        inception_score,
        mse,
        precision_recall,
        psnr,
    )
    from saq_deploy.eval.train_classifier import train_and_save


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"saq_deploy.eval.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'saq_deploy.eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
