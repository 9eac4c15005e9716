"""Evaluation across torchrun ranks (docs/design/distributed.md §3).

Each rank samples whole batches of the single-process run (:func:`sample_rows`), so its samples are
bit-identical to the ones one process draws for the same seeds; it then extracts features and class
probabilities of its own samples, and only those (not images) are gathered. Paired metrics (MSE,
PSNR against an FP reference at the same seeds) are reduced as sums of squared errors. The set
statistics (FID, IS, precision/recall) then equal the single-process figures to float tolerance:
only the feature extractor's batch boundaries differ."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from saq_deploy.utils import distributed


def sample_rows(n: int, batch_size: int) -> range:
    """The samples this rank draws: a contiguous run of whole ``batch_size`` batches of ``range(n)``."""
    batches = distributed.shard_range(-(-n // batch_size))
    return range(min(n, batches.start * batch_size), min(n, batches.stop * batch_size))


def gather_rows(values: Any, what: str = "gathering samples") -> Any:
    """Concatenate every rank's (rows, ...) array or tensor in rank order."""
    parts = [p for p in distributed.all_gather_objects(values, what) if p is not None and len(p)]
    if not parts:
        return values
    if hasattr(parts[0], "detach"):
        import torch

        return torch.cat(parts)
    return np.concatenate(parts)


def evaluate_sharded(images: Any, labels: Any = None, *, reference_images: Any = None, classifier=None,
                     fid_stats=None, k: int = 3) -> dict[str, float | int]:
    """:func:`saq_deploy.eval.metrics.evaluate_samples` over every rank's ``images`` (this rank's
    rows; possibly none). Every rank returns the same dictionary."""
    from saq_deploy.eval.features import DigitFeatures, as_image_tensor
    from saq_deploy.eval.metrics import metrics_from_features, psnr_from_mse

    extractor = DigitFeatures(classifier)
    x = as_image_tensor(images) if len(images) else None
    feats = extractor(x) if x is not None else None
    probs = extractor.probs(x) if x is not None else None
    lab = None if labels is None else np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
    feats, probs = gather_rows(feats, "gathering features"), gather_rows(probs, "gathering class probabilities")
    lab = None if labels is None else gather_rows(lab, "gathering labels")
    out = metrics_from_features(feats, probs, lab, extractor=extractor, fid_stats=fid_stats, k=k)
    if reference_images is not None:
        sse, count = 0.0, 0
        if x is not None:
            diff = x.double() - as_image_tensor(reference_images).double()
            sse, count = float((diff * diff).sum()), diff.numel()
        sums = distributed.all_gather_objects((sse, count), "reducing paired errors")
        total, n = math.fsum(s for s, _ in sums), sum(c for _, c in sums)
        out["mse"] = total / n
        out["psnr"] = psnr_from_mse(out["mse"], data_range=2.0)
    return out
