"""Image grids for samples in [-1, 1] (PNG through Pillow, which diffusers already depends on)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from saq_deploy.utils.io import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, *, nrow: int | None = None, scale: int = 4, pad: int = 2) -> np.ndarray:
    """Tile images into one (H', W', C) uint8 array, upscaled by ``scale`` (nearest) for visibility."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    ncol = nrow or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = arr[i]
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, *, nrow: int | None = None, scale: int = 4) -> None:
    from PIL import Image

    grid = make_grid(images, nrow=nrow, scale=scale)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
