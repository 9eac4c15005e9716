"""Image grids for samples in [-1, 1] (PNG through Pillow, which diffusers already depends on).

1-channel samples are written as grayscale and 3-channel ones as RGB. Any other channel count
(a latent UNet's 4 channels, with no VAE to decode them) is NOT an image: written as RGBA its 4th
channel would become alpha and the PNG would look mostly transparent. Such samples become a
per-channel grayscale grid instead: one row per sample, one tile per channel, all tiles on one
symmetric scale (values beyond [-1, 1] are scaled down together, not clipped), and
:func:`save_grid` returns a note saying so for the caller to print."""

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


def per_channel_tiles(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N * C, 1, H, W) in [-1, 1]: sample-major, so a grid with ``nrow=C`` shows
    one sample per row. One shared scale (max(1, absmax)) keeps channels comparable and leaves
    samples already in [-1, 1] exactly as a grayscale grid would show them."""
    x = images.detach().float()
    peak = float(x.abs().max()) if x.numel() else 1.0
    x = x / max(1.0, peak)
    n, c, h, w = x.shape
    return x.reshape(n * c, 1, h, w)


def save_grid(images: torch.Tensor, path: str | os.PathLike, *, nrow: int | None = None,
              scale: int = 4) -> str | None:
    """Write a PNG grid; returns a one-line note when the samples were not written as an image
    (channel count other than 1 or 3: per-channel grid, see the module docstring), else None."""
    from PIL import Image

    note = None
    c = int(images.shape[1])
    if c not in (1, 3):
        images, nrow = per_channel_tiles(images), c
        note = (f"{c}-channel samples are not RGB (a latent UNet needs its VAE to decode them): wrote a "
                f"per-channel grayscale grid, one row per sample, {c} tiles per row (channel 0..{c - 1})")
    grid = make_grid(images, nrow=nrow, scale=scale)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return note
