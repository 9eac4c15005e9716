"""Sample grids: grayscale / RGB as is; other channel counts (4-channel latents) never as RGBA."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from saq_deploy.utils.images import save_grid, to_uint8

PAD = 2


def _tile(arr: np.ndarray, r: int, q: int, h: int, w: int) -> np.ndarray:
    """Tile (row r, column q) of a grid written with scale=1 and the default padding."""
    return arr[PAD + r * (h + PAD): PAD + r * (h + PAD) + h, PAD + q * (w + PAD): PAD + q * (w + PAD) + w]


def test_four_channel_grid_is_a_per_channel_grayscale_grid(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 4, 5, 6, generator=g) * 1.6 - 0.8  # inside [-1, 1]: no rescaling
    out = tmp_path / "latents.png"
    note = save_grid(x, out, scale=1)
    img = Image.open(out)
    assert img.mode == "L"  # not RGBA: no channel became alpha
    arr = np.asarray(img)
    # one row per sample, one tile per channel
    assert arr.shape == (3 * (5 + PAD) + PAD, 4 * (6 + PAD) + PAD)
    for i in range(3):
        for c in range(4):
            expect = to_uint8(x[i:i + 1, c:c + 1])[0, ..., 0]
            assert np.array_equal(_tile(arr, i, c, 5, 6), expect), (i, c)
    assert note is not None and "4-channel" in note and "per-channel" in note


def test_latents_beyond_unit_range_are_scaled_together_not_clipped(tmp_path):
    x = torch.zeros(1, 4, 2, 2)
    x[0, 0] = 4.0  # a latent's typical range exceeds [-1, 1]
    x[0, 1] = 2.0
    x[0, 2] = -4.0
    save_grid(x, tmp_path / "l.png", scale=1)
    arr = np.asarray(Image.open(tmp_path / "l.png"))
    vals = [int(_tile(arr, 0, c, 2, 2)[0, 0]) for c in range(4)]
    # shared scale 1/4: 4 -> 1 -> 255, 2 -> 0.5 -> 191, -4 -> -1 -> 0, 0 -> 128 (clipping would give 2 -> 255)
    assert vals == [255, 191, 0, 128]


def test_rgb_and_gray_grids_unchanged(tmp_path):
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    assert save_grid(x, tmp_path / "rgb.png", scale=1) is None
    rgb = Image.open(tmp_path / "rgb.png")
    assert rgb.mode == "RGB"
    assert np.array_equal(_tile(np.asarray(rgb), 0, 1, 4, 4), to_uint8(x[1:2])[0])
    assert save_grid(x[:, :1], tmp_path / "g.png", scale=1) is None
    assert Image.open(tmp_path / "g.png").mode == "L"
