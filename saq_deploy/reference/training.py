"""What the two reference trainers (``train.py``: builtin:digits, ``text_train.py``:
builtin:digits-text) share: the learning-rate schedule, the EMA update, deterministic algorithms,
the forward-noising and optimizer step, and the training log's loss/environment fields.

The committed weights were produced by these functions, so each must keep computing exactly what
it computes now (same float operations in the same order): a change here changes both models."""

from __future__ import annotations

import math
import platform
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

DATA_NOTE = "sklearn.datasets.load_digits, all 1797 images, bilinear 8x8->16x16, scaled to [-1, 1]"


def warmup_cosine_lr(step: int, *, lr: float, warmup: int, steps: int) -> float:
    """Linear warmup over ``warmup`` steps to ``lr`` (step 0 already gets lr / warmup, never 0),
    then cosine decay towards 0 over the remaining ``steps - warmup``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * frac))


def noised(x0: torch.Tensor, alphas_cumprod: torch.Tensor, num_train_timesteps: int,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, noise): DDPM's forward process at uniform random timesteps (t drawn before the noise,
    from the one data-order generator, so the draw order is part of the seed's meaning)."""
    t = torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.nn.Parameter],
                   lr: float) -> None:
    """One optimizer step at ``lr``, the gradient norm clipped to 1 (what the committed weights used)."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


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


def run_from_argv(train, config_cls, default_out: Path) -> None:
    """``python -m saq_deploy.reference.<trainer> [STEPS] [OUT]``: train, print the log's summary."""
    import json
    import sys

    steps = int(sys.argv[1]) if len(sys.argv) > 1 else config_cls.steps
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    result = train(out, config_cls(steps=steps))
    print(json.dumps({k: v for k, v in result.items() if k != "loss_every_100"}, indent=2))


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
