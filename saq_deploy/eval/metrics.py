"""Sample-quality metrics: inception score, k-NN precision/recall, class accuracy, and metrics paired
with an FP reference generated at the same seeds (MSE, PSNR); `evaluate_samples` bundles them for
the built-in digits model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from saq_deploy.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from saq_deploy.eval.classifier import DigitClassifier
    from saq_deploy.eval.fid import FIDStats

ArrayLike = Any  # numpy array or torch tensor


def _np(x: ArrayLike, dtype: type = np.float64) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def inception_score(probs: ArrayLike, splits: int = 1) -> float:
    """exp(E_x KL(p(y|x) || p(y))) from (N, K) class probabilities, averaged over ``splits`` chunks.

    Ranges from 1 (every sample gets the same prediction) to K (confident and evenly spread)."""
    from scipy.special import rel_entr

    p = _np(probs)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ConfigError(f"probs must be a non-empty (N, K) array, got shape {p.shape}")
    if (p < -1e-9).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ConfigError(
            "probs rows must be probability distributions (non-negative, summing to 1); apply softmax"
        )
    if not 1 <= splits <= p.shape[0]:
        raise ConfigError(f"splits must be between 1 and the number of samples ({p.shape[0]}), got {splits}")
    p = np.clip(p, 0.0, None)
    scores = []
    for chunk in np.array_split(p, splits):
        py = chunk.mean(axis=0, keepdims=True)
        kl = rel_entr(chunk, py).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores))


def _kth_nn_radii(feats: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour within the same set (self excluded)."""
    radii = np.empty(len(feats))
    for i in range(0, len(feats), chunk):
        d = _pairwise_dist(feats[i : i + chunk], feats)
        radii[i : i + chunk] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
    return radii


def _pairwise_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def _coverage(points: np.ndarray, centers: np.ndarray, radii: np.ndarray, chunk: int = 1024) -> float:
    """Fraction of ``points`` inside at least one ball (center, radius)."""
    inside = np.zeros(len(points), dtype=bool)
    for i in range(0, len(points), chunk):
        d = _pairwise_dist(points[i : i + chunk], centers)
        inside[i : i + chunk] = (d <= radii[None, :] * (1 + 1e-9) + 1e-12).any(axis=1)
    return float(inside.mean())


def precision_recall(real_feats: ArrayLike, fake_feats: ArrayLike, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifold estimates.

    precision: fraction of fake samples inside the real manifold (union of balls around real
    samples, radius = distance to the k-th nearest real neighbour); recall: the converse."""
    real, fake = _np(real_feats), _np(fake_feats)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ConfigError(f"feature sets must be (N, D) with the same D, got {real.shape} and {fake.shape}")
    if k < 1 or min(len(real), len(fake)) <= k:
        raise ConfigError(f"precision/recall with k={k} needs k >= 1 and more than k samples in each set")
    precision = _coverage(fake, real, _kth_nn_radii(real, k))
    recall = _coverage(real, fake, _kth_nn_radii(fake, k))
    return precision, recall


def class_accuracy(logits_or_probs: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of rows whose argmax equals the label."""
    s = _np(logits_or_probs)
    y = _np(labels, np.int64).reshape(-1)
    if s.ndim != 2 or len(s) != len(y):
        raise ConfigError(f"need (N, K) scores and (N,) labels, got {s.shape} and {y.shape}")
    if len(y) == 0:
        raise ConfigError("class_accuracy needs at least one sample")
    return float((s.argmax(axis=1) == y).mean())


def mse(a: ArrayLike, b: ArrayLike) -> float:
    """Mean squared error over all elements of two same-shape arrays (e.g. quantized vs FP samples)."""
    x, y = _np(a), _np(b)
    if x.shape != y.shape:
        raise ConfigError(f"mse needs arrays of the same shape, got {x.shape} and {y.shape}")
    if x.size == 0:
        raise ConfigError("mse needs non-empty arrays")
    return float(np.mean((x - y) ** 2))


def psnr(a: ArrayLike, b: ArrayLike, data_range: float = 2.0) -> float:
    """10 log10(data_range^2 / MSE) in dB, MSE over all pixels; data_range 2.0 for [-1, 1] images.
    Identical inputs give +inf."""
    return psnr_from_mse(mse(a, b), data_range)


def psnr_from_mse(m: float, data_range: float = 2.0) -> float:
    """PSNR in dB of a known MSE (a sharded evaluation reduces the MSE first)."""
    if data_range <= 0:
        raise ConfigError(f"data_range must be positive, got {data_range}")
    return math.inf if m == 0.0 else float(10.0 * math.log10(data_range**2 / m))


def _real_features(stats: FIDStats, extractor: Any) -> np.ndarray:
    if stats.features is not None:
        return np.asarray(stats.features, dtype=np.float64)
    from saq_deploy.reference.data import load_digits_16

    images, _ = load_digits_16(split="all")
    return extractor(images)


def evaluate_samples(
    images: torch.Tensor | np.ndarray,
    labels: ArrayLike | None = None,
    *,
    reference_images: torch.Tensor | np.ndarray | None = None,
    classifier: DigitClassifier | None = None,
    fid_stats: FIDStats | str | Path | None = None,
    k: int = 3,
) -> dict[str, float | int]:
    """All metrics for (N, 1, 16, 16) digit samples in [-1, 1].

    Returns digit_fid, inception_score, precision, recall, n_samples; accuracy when ``labels`` (the
    class each sample was conditioned on) are given; mse and psnr when ``reference_images`` (the FP
    model's samples at the same seeds) are given. Defaults: the committed classifier and stats."""
    from saq_deploy.eval.features import DigitFeatures, as_image_tensor

    x = as_image_tensor(images)
    extractor = DigitFeatures(classifier)
    out = metrics_from_features(extractor(x), extractor.probs(x), labels, extractor=extractor,
                                fid_stats=fid_stats, k=k)
    if reference_images is not None:
        ref = as_image_tensor(reference_images)
        out["mse"] = mse(x, ref)
        out["psnr"] = psnr(x, ref, data_range=2.0)
    return out


def metrics_from_features(feats: np.ndarray, probs: np.ndarray, labels: ArrayLike | None = None, *,
                          extractor: Any, fid_stats: FIDStats | str | Path | None = None,
                          k: int = 3) -> dict[str, float | int]:
    """The set metrics of :func:`evaluate_samples` from (N, D) features and (N, K) probabilities, so a
    sharded evaluation can gather features instead of images (saq_deploy.eval.sharded)."""
    from saq_deploy.eval.fid import FIDStats, compute_stats, frechet_distance
    from saq_deploy.reference import DIGITS_FID_STATS_PATH

    stats = (
        fid_stats if isinstance(fid_stats, FIDStats) else FIDStats.load(fid_stats or DIGITS_FID_STATS_PATH)
    )
    out: dict[str, float | int] = {"n_samples": len(feats)}
    out["digit_fid"] = frechet_distance(compute_stats(feats, extractor.name), stats)
    out["inception_score"] = inception_score(probs)
    out["precision"], out["recall"] = precision_recall(_real_features(stats, extractor), feats, k=k)
    if labels is not None:
        out["accuracy"] = class_accuracy(probs, labels)
    return out
