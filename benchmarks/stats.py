"""Confidence intervals the quality benchmarks share (text_quality.py, testbed.py).

FID intervals use the bootstrap's spread around the estimate, not its percentiles: resampling with
replacement duplicates samples, which biases FID upwards, so a percentile interval can miss the
estimate itself. Paired figures (two models sampled from the same x_T and labels) resample the
same indices for both, so the interval is that of the difference, not of either figure alone."""

from __future__ import annotations

import math

import numpy as np
import torch


def wilson(k: int, n: int) -> tuple[float, float]:
    z = 1.96
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _ref_stats():
    from saq_deploy.eval.fid import FIDStats
    from saq_deploy.reference import DIGITS_FID_STATS_PATH

    return FIDStats.load(DIGITS_FID_STATS_PATH)


def _fid(feats: np.ndarray, name: str, ref) -> float:
    from saq_deploy.eval.fid import compute_stats, frechet_distance

    return frechet_distance(compute_stats(feats, name), ref)


def fid_with_ci(feats: np.ndarray, name: str, resamples: int, seed: int) -> tuple[float, float, float]:
    ref = _ref_stats()
    value = _fid(feats, name, ref)
    rng = np.random.default_rng(seed)
    boot = [_fid(feats[rng.integers(0, len(feats), len(feats))], name, ref) for _ in range(resamples)]
    half = 1.96 * float(np.std(boot, ddof=1))
    return value, value - half, value + half


def paired_fid_delta(feats: np.ndarray, base: np.ndarray, name: str, resamples: int, seed: int) -> dict:
    """FID(feats) - FID(base) with a 95 % interval from resampling the same sample indices."""
    ref = _ref_stats()
    delta = _fid(feats, name, ref) - _fid(base, name, ref)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(resamples):
        i = rng.integers(0, len(feats), len(feats))
        boot.append(_fid(feats[i], name, ref) - _fid(base[i], name, ref))
    half = 1.96 * float(np.std(boot, ddof=1))
    return {"delta": delta, "ci": [delta - half, delta + half]}


def per_sample_mse(x: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    return (x - ref).double().pow(2).flatten(1).mean(1).numpy()


def mean_ci(per: np.ndarray, resamples: int, seed: int) -> tuple[float, list[float]]:
    rng = np.random.default_rng(seed)
    boot = [per[rng.integers(0, len(per), len(per))].mean() for _ in range(resamples)]
    return float(per.mean()), [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def paired_psnr(x: torch.Tensor, ref: torch.Tensor, resamples: int, seed: int) -> dict:
    per = 10 * np.log10(4.0 / np.maximum(per_sample_mse(x, ref), 1e-12))  # [-1, 1]: peak-to-peak 2
    value, ci = mean_ci(per, resamples, seed)
    return {"psnr_vs_fp": value, "psnr_vs_fp_ci": ci}
