"""Feature extractors for FID and precision/recall.

A FeatureExtractor maps images (N, C, H, W) in [-1, 1] to float64 features (N, D) and has a
``name`` that identifies the feature space; FID statistics remember it, and comparing statistics
from two different feature spaces is refused.

- DigitFeatures: the built-in digits classifier's penultimate layer (128-d), for `builtin:digits`.
- InceptionFeatures: Inception-v3 pool3 (2048-d) via torch-fidelity, for real models, from weights
  the user already has on disk. Nothing is ever downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

from saq_deploy.errors import BackendUnavailableError, ConfigError, ModelLoadError

if TYPE_CHECKING:
    from saq_deploy.eval.classifier import DigitClassifier


@runtime_checkable
class FeatureExtractor(Protocol):
    """images (N, C, H, W) in [-1, 1] (torch tensor or numpy array) -> (N, D) float64 numpy."""

    name: str

    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray: ...


def as_image_tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Validate and convert an image batch to a float32 CPU tensor of shape (N, C, H, W)."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ConfigError(f"images must have shape (N, C, H, W), got {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float32)


class DigitFeatures:
    """Penultimate-layer features of the digits classifier (batched, no grad, float64 output)."""

    def __init__(self, classifier: DigitClassifier | None = None, *, batch_size: int = 512) -> None:
        from saq_deploy.eval.classifier import fingerprint, load_classifier

        self.classifier = classifier if classifier is not None else load_classifier()
        self.classifier.eval()
        self.batch_size = batch_size
        self.name = f"digit-cnn-penultimate:{fingerprint(self.classifier)}"
        self.dim = self.classifier.feature_dim

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        x = as_image_tensor(images)
        if tuple(x.shape[1:]) != (1, 16, 16):
            raise ConfigError(f"DigitFeatures needs (N, 1, 16, 16) images in [-1, 1], got {tuple(x.shape)}")
        out = [
            self.classifier.features(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)
        ]
        if not out:
            return np.zeros((0, self.dim), dtype=np.float64)
        return torch.cat(out).double().numpy()

    @torch.no_grad()
    def probs(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Softmax class probabilities (N, num_classes), float64."""
        x = as_image_tensor(images)
        out = [self.classifier.logits(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        if not out:
            return np.zeros((0, self.classifier.num_classes), dtype=np.float64)
        return torch.softmax(torch.cat(out).double(), dim=1).numpy()


INCEPTION_INSTALL_HINT = (
    "InceptionFeatures needs torch-fidelity: `pip install torch-fidelity` "
    "(and a local copy of its Inception-v3 weights file; nothing is downloaded)"
)


class InceptionFeatures:
    """Inception-v3 pool3 features (2048-d) with torch-fidelity's FID-compatible network.

    ``weights_path`` must point at a local copy of the weights (e.g. torch-fidelity's
    ``weights-inception-2015-12-05-6726825d.pth``); it is passed as ``feature_extractor_weights_path``
    so torch-fidelity never downloads. Grey images are repeated to 3 channels and quantized to uint8.
    """

    FEATURE = "2048"

    def __init__(self, weights_path: str | Path, *, batch_size: int = 64, device: str = "cpu") -> None:
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise BackendUnavailableError(INCEPTION_INSTALL_HINT) from None
        path = Path(weights_path)
        if not path.is_file():
            raise ModelLoadError(
                f"Inception weights not found at {path}; pass the path of a local copy (nothing is downloaded)"
            )
        try:
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", [self.FEATURE], feature_extractor_weights_path=str(path)
            )
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"cannot load Inception weights from {path}: {e}") from None
        self.model = net.eval().to(device)
        self.device = device
        self.batch_size = batch_size
        self.name = "inception-v3-compat:pool3-2048"
        self.dim = 2048

    @staticmethod
    def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[1] != 3:
            raise ConfigError(f"InceptionFeatures needs 1- or 3-channel images, got {x.shape[1]} channels")
        return x

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        x = self.to_uint8_rgb(as_image_tensor(images))
        out = []
        for i in range(0, len(x), self.batch_size):
            feats = self.model(x[i : i + self.batch_size].to(self.device))
            feats = feats[0] if isinstance(feats, (tuple, list)) else feats
            out.append(feats.reshape(len(feats), -1).double().cpu())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float64)
        return torch.cat(out).numpy()
