"""What the two reference trainers (``train.py``: builtin:digits, ``text_train.py``:
builtin:digits-text) share: the learning-rate schedule, the EMA update, deterministic algorithms
and the loss/environment fields of the training log.

The committed weights were produced by these functions, so each must keep computing exactly what
it computes now (same float operations in the same order): a change here changes both models."""

from __future__ import annotations

import math
import platform
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

DATA_NOTE = "sklearn.datasets.load_digits, all 1797 images, bilinear 8x8->16x16, scaled to [-1, 1]"


def warmup_cosine_lr(step: int, *, lr: float, warmup: int, steps: int) -> float:
    """Linear warmup over ``warmup`` steps to ``lr`` (step 0 already gets lr / warmup, never 0),
    then cosine decay towards 0 over the remaining ``steps - warmup``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * frac))


def ema_decay_at(step: int, max_decay: float) -> float:
    # ramped so the EMA of a short run is not dominated by the random initial weights
    return min(max_decay, (1 + step) / (10 + step))


def ema_update(pairs: Iterable[tuple[torch.nn.Module, torch.nn.Module]], step: int, max_decay: float) -> None:
    """Move each ``(ema, live)`` pair's EMA parameters towards the live ones, in place."""
    decay = ema_decay_at(step, max_decay)
    with torch.no_grad():
        for ema, live in pairs:
            for pe, p in zip(ema.parameters(), live.parameters()):
                pe.lerp_(p, 1 - decay)


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Deterministic kernels for the body (the seed alone must reproduce the weights), restoring the
    caller's setting afterwards, as the trainers are also called from tests and the CLI."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def recent_loss(losses: list[float], window: int = 200) -> float:
    return sum(losses[-window:]) / len(losses[-window:])


def loss_fields(losses: list[float]) -> dict:
    """The training log's loss entries (last-200 mean, means per 100 steps)."""
    return {"final_loss_mean_last_200": recent_loss(losses),
            "loss_every_100": [sum(losses[i: i + 100]) / len(losses[i: i + 100]) for i in range(0, len(losses), 100)]}


def environment_fields() -> dict:
    """The training log's record of what it ran on (wall time and results depend on it)."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "data": DATA_NOTE}
