"""Fréchet distance between Gaussian fits of feature sets (FID), for any FeatureExtractor.

Statistics carry the name of the feature space they were computed in; comparing statistics from
different feature spaces (e.g. digit-CNN stats against Inception features) raises ConfigError."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from saq_deploy.errors import ConfigError, ModelLoadError, SaqError
from saq_deploy.utils.io import write_bytes_atomic

if TYPE_CHECKING:
    import torch

    from saq_deploy.eval.features import FeatureExtractor

SQRTM_EPS = 1e-6


@dataclass(frozen=True)
class FIDStats:
    """Mean (D,), covariance (D, D), sample count and feature-space name of a feature set.

    ``features`` optionally keeps the raw (N, D) features (float32) so precision/recall can use the
    same reference set; ``labels`` optionally keeps their class labels."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    feature_name: str
    features: np.ndarray | None = None
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        mu = np.asarray(self.mu, dtype=np.float64)
        sigma = np.asarray(self.sigma, dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ConfigError(f"FIDStats needs mu (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "feature_name", str(self.feature_name))

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: str | Path) -> Path:
        """Write a compressed .npz atomically (temp file in the same folder, then rename)."""
        arrays: dict[str, np.ndarray] = {
            "mu": self.mu,
            "sigma": self.sigma,
            "n": np.array(self.n, dtype=np.int64),
            "feature_name": np.array(self.feature_name),
        }
        if self.features is not None:
            arrays["features"] = np.asarray(self.features, dtype=np.float32)
        if self.labels is not None:
            arrays["labels"] = np.asarray(self.labels, dtype=np.int64)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        write_bytes_atomic(path, buf.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> FIDStats:
        """Read stats written by :meth:`save`. Missing or unreadable file -> ModelLoadError."""
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(
                f"FID statistics not found at {path}; compute them with saq_deploy.eval.fid.compute_stats "
                "(for builtin digits: `python -m saq_deploy.eval.train_classifier`)"
            )
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(
                    mu=z["mu"],
                    sigma=z["sigma"],
                    n=int(z["n"]),
                    feature_name=str(z["feature_name"]),
                    features=z["features"] if "features" in z.files else None,
                    labels=z["labels"] if "labels" in z.files else None,
                )
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"FID statistics at {path} are corrupt or incomplete ({e})") from None


def compute_stats(
    features: np.ndarray,
    feature_name: str = "unnamed",
    *,
    keep_features: bool = False,
    labels: np.ndarray | None = None,
) -> FIDStats:
    """Mean and unbiased covariance (float64) of (N, D) features; N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ConfigError(f"features must be a 2-D (N, D) array, got shape {f.shape}")
    if f.shape[0] < 2:
        raise ConfigError(f"FID statistics need at least 2 samples, got {f.shape[0]}")
    if not np.isfinite(f).all():
        raise ConfigError("features contain NaN or Inf; check the images fed to the feature extractor")
    return FIDStats(
        mu=f.mean(axis=0),
        sigma=np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]),
        n=f.shape[0],
        feature_name=feature_name,
        features=f.astype(np.float32) if keep_features else None,
        labels=labels,
    )


def check_compatible(a: FIDStats, b: FIDStats) -> None:
    """Raise ConfigError unless ``a`` and ``b`` live in the same feature space."""
    if a.feature_name != b.feature_name:
        raise ConfigError(
            f"cannot compare FID statistics from different feature extractors "
            f"({a.feature_name!r} vs {b.feature_name!r}); recompute the reference stats with the same extractor"
        )
    if a.dim != b.dim:
        raise ConfigError(f"FID statistics have different feature dimensions ({a.dim} vs {b.dim})")


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, float]:
    """Matrix square root and its relative Frobenius error estimate."""
    from scipy import linalg

    with warnings.catch_warnings():  # singular inputs warn; the error estimate below handles them
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        x = linalg.sqrtm(a)
    if not np.isfinite(x).all():
        return x, float("inf")
    denom = max(float(np.linalg.norm(a, "fro")), 1e-300)
    return x, float(np.linalg.norm(x @ x - a, "fro") / denom)


def frechet_distance(stats_a: FIDStats, stats_b: FIDStats, *, eps: float = SQRTM_EPS) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) in float64.

    Standard stability handling (as in pytorch-fid): if the product's square root is not finite or
    inaccurate (near-singular covariances), ``eps`` is added to both diagonals and it is recomputed;
    a negligible imaginary part from rounding is dropped, a large one raises SaqError."""
    check_compatible(stats_a, stats_b)
    mu1, mu2, s1, s2 = stats_a.mu, stats_b.mu, stats_a.sigma, stats_b.sigma
    diff = mu1 - mu2
    covmean, err = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all() or err > 1e-3:
        offset = np.eye(s1.shape[0]) * eps
        covmean, err = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag)) if covmean.size else 0.0
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise SaqError(
                f"Fréchet distance is numerically unstable (imaginary component {imag:.3g}); "
                "use more samples than feature dimensions"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid(
    images: torch.Tensor | np.ndarray,
    reference_stats: FIDStats | str | Path,
    extractor: FeatureExtractor,
) -> float:
    """FID of ``images`` (N, C, H, W) in [-1, 1] against ``reference_stats`` in ``extractor``'s space."""
    ref = reference_stats if isinstance(reference_stats, FIDStats) else FIDStats.load(reference_stats)
    name = getattr(extractor, "name", None)
    if not isinstance(name, str) or not callable(extractor):
        raise ConfigError(
            "extractor must be a FeatureExtractor: callable images -> (N, D) features with a `name`"
        )
    if name != ref.feature_name:
        raise ConfigError(
            f"reference FID statistics were computed with {ref.feature_name!r} but the extractor is {name!r}; "
            "recompute the reference stats with this extractor"
        )
    stats = compute_stats(np.asarray(extractor(images)), name)
    return frechet_distance(stats, ref)
