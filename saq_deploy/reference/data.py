"""scikit-learn's bundled digits (1,797 images, 8x8, 16 grey levels) as 16x16 tensors in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16


def load_digits_16(*, split: str = "all", holdout_fraction: float = 0.2, seed: int = 0):
    """Return ``(images, labels)``: images (N, 1, 16, 16) float32 in [-1, 1], labels (N,) int64.

    ``split`` is "all", "train" or "heldout"; the split is stratified by class and fixed by ``seed``
    so the metric classifier's held-out accuracy is reproducible.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    if split == "all":
        return x, y
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'all', 'train' or 'heldout', got {split!r}")
    from sklearn.model_selection import train_test_split

    idx_train, idx_held = train_test_split(
        np.arange(len(y)), test_size=holdout_fraction, random_state=seed, stratify=y.numpy()
    )
    idx = torch.from_numpy(idx_train if split == "train" else idx_held)
    return x[idx], y[idx]
