"""The digits metric classifier: a small CNN for 1x16x16 digits in [-1, 1].

Its penultimate layer is the feature space of the "digit FID" (the role Inception-v3 plays for
natural images) and its softmax feeds the inception score and class accuracy. Training is
deterministic on CPU from the seed; weights are stored as safetensors with a metadata header."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from saq_deploy.errors import ModelLoadError
from saq_deploy.reference import DIGITS_CLASSIFIER_PATH, NUM_CLASSES

FEATURE_DIM = 128
ARCH = "digit-cnn-v2"


class DigitClassifier(nn.Module):
    """conv16-conv32-pool-conv64-pool (ReLU) -> fc128 -> GELU -> fc10 (~0.16 M parameters).

    ``features`` is the 128-d penultimate layer taken before its activation: a linear map of the
    conv features, so no unit can die and the real digits' feature covariance stays full rank."""

    def __init__(self, num_classes: int = NUM_CLASSES, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
        )
        self.fc = nn.Linear(64 * 4 * 4, feature_dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features, (N, feature_dim)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 16, 16):
            raise ValueError(f"expected images of shape (N, 1, 16, 16), got {tuple(x.shape)}")
        return self.fc(self.body(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.act(self.features(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


def fingerprint(model: nn.Module) -> str:
    """A short hash of the weights; it names the feature space so stats from other weights are refused."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class ClassifierTrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1  # random +-pixel translation augmentation
    seed: int = 0


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value -1."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for oy in range(2 * max_shift + 1):  # one slice per offset instead of one per image
        for ox in range(2 * max_shift + 1):
            sel = (dy == oy) & (dx == ox)
            if sel.any():
                out[sel] = padded[sel, :, oy : oy + h, ox : ox + w]
    return out


@torch.no_grad()
def accuracy(
    model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (
            (model.logits(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
        )
    model.train(was_training)
    return correct / max(1, len(images))


def train_classifier(
    seed: int = 0, *, epochs: int | None = None, config: ClassifierTrainConfig | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[DigitClassifier, dict]:
    """Train on the "train" split, evaluate on "heldout". Returns ``(model in eval mode, report)``;
    ``on_epoch(epoch, train_loss)`` hears each finished epoch (progress)."""
    from saq_deploy.reference.data import load_digits_16

    cfg = config or ClassifierTrainConfig(seed=seed)
    if epochs is not None:
        cfg = ClassifierTrainConfig(**{**asdict(cfg), "epochs": epochs})
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        x_tr, y_tr = load_digits_16(split="train", seed=0)
        x_he, y_he = load_digits_16(split="heldout", seed=0)
        model = DigitClassifier()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(len(x_tr) / cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        t0 = time.perf_counter()
        history: list[dict] = []
        model.train()
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(x_tr), generator=gen)
            loss_sum = 0.0
            for i in range(0, len(perm), cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                xb = _random_shift(x_tr[idx], cfg.max_shift, gen)
                loss = nn.functional.cross_entropy(model(xb), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.item() * len(idx)
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / len(x_tr)})
            if on_epoch is not None:
                on_epoch(epoch + 1, history[-1]["train_loss"])
        train_time = time.perf_counter() - t0
        model.eval()
        report = {
            "arch": ARCH,
            "heldout_accuracy": accuracy(model, x_he, y_he),
            "train_accuracy": accuracy(model, x_tr, y_tr),
            "n_train": len(x_tr),
            "n_heldout": len(x_he),
            "train_time_s": round(train_time, 2),
            "seed": cfg.seed,
            "epochs": cfg.epochs,
            "config": asdict(cfg),
            "data_split": "load_digits_16 train/heldout, holdout_fraction=0.2, split seed=0, stratified",
            "final_train_loss": history[-1]["train_loss"] if history else None,
            "torch": torch.__version__,
            "fingerprint": fingerprint(model),
        }
        return model, report
    finally:
        torch.use_deterministic_algorithms(prev_det)


def save_classifier(model: DigitClassifier, path: str | Path, metadata: dict | None = None) -> Path:
    """Write the weights as safetensors (atomically); ``metadata`` values are stored as JSON strings."""
    from saq_deploy.utils.io import save_safetensors

    meta = {"arch": ARCH, "feature_dim": str(model.feature_dim), "num_classes": str(model.num_classes)}
    meta["fingerprint"] = fingerprint(model)
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(tensors, path, metadata=meta)  # byte-reproducible header
    return Path(path)


def read_classifier_metadata(path: str | Path = DIGITS_CLASSIFIER_PATH) -> dict[str, str]:
    """The safetensors header metadata of a saved classifier (raw strings)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any read failure is a user-fixable file problem
        raise ModelLoadError(f"cannot read classifier metadata from {path}: {e}") from None


def load_classifier(path: str | Path = DIGITS_CLASSIFIER_PATH) -> DigitClassifier:
    """Load a saved classifier in eval mode. Missing or unreadable file -> ModelLoadError."""
    from safetensors.torch import load_file

    path = Path(path)
    hint = "run `python -m saq_deploy.eval.train_classifier` to (re)create it"
    if not path.is_file():
        raise ModelLoadError(f"digits classifier not found at {path}; {hint}")
    try:
        tensors = load_file(str(path))
        meta = read_classifier_metadata(path)
        feature_dim = int(meta.get("feature_dim", FEATURE_DIM))
        num_classes = int(meta.get("num_classes", NUM_CLASSES))
        model = DigitClassifier(num_classes=num_classes, feature_dim=feature_dim)
        model.load_state_dict(tensors, strict=True)
    except ModelLoadError:
        raise ModelLoadError(
            f"digits classifier at {path} is corrupt or not a safetensors file; {hint}"
        ) from None
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"digits classifier at {path} is corrupt or incompatible ({msg}); {hint}"
        ) from None
    model.eval()
    model.requires_grad_(False)
    return model
