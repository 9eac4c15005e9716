"""The built-in reference model (`builtin:digits`) and its metric classifier, trained on
scikit-learn's bundled digits by scripts in this package; weights ship as package data."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
DIGITS_UNET_DIR = WEIGHTS_DIR / "digits_unet"
DIGITS_TEXT_DIR = WEIGHTS_DIR / "digits_text"  # text-to-image pipeline folder (builtin:digits-text)
DIGITS_CLASSIFIER_PATH = WEIGHTS_DIR / "digits_classifier.safetensors"
DIGITS_FID_STATS_PATH = WEIGHTS_DIR / "digits_fid_stats.npz"

NUM_CLASSES = 10
NULL_LABEL = 10  # the extra class embedding used for classifier-free guidance's unconditional branch
