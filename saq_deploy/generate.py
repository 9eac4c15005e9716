"""Generate samples: seeded noise -> (optional CFG) -> a named sampler over any EpsModel.

This is the one sampling driver used by the CLI, calibration and validation, whatever backend
implements the EpsModel (PyTorch FP32, fake-quant, ONNX Runtime, TensorRT)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from saq_deploy.errors import BadOptionError, ConfigError


@dataclass(frozen=True)
class SampleSettings:
    sampler: str = "dpmpp-2m"
    steps: int = 10
    cfg: float = 1.5
    seed: int = 0
    n: int = 64
    label: int | None = None  # None: labels cycle 0..num_classes-1
    spacing: str | None = None  # None: the sampler's diffusers default
    batch_size: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


def initial_noise(shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    """x_T for ``n`` samples; drawn all at once so the batch size never changes the result."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g, dtype=torch.float32)


def class_labels(n: int, num_classes: int, label: int | None) -> torch.Tensor:
    if label is None:
        return torch.arange(n, dtype=torch.long) % num_classes
    if not 0 <= label < num_classes:
        raise BadOptionError(f"--label {label} is outside 0..{num_classes - 1} for this model")
    return torch.full((n,), label, dtype=torch.long)


def validate_settings(s: SampleSettings) -> None:
    from saq_deploy.samplers.registry import SAMPLERS

    if s.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{s.sampler}'; choose one of: {', '.join(SAMPLERS)}")
    if s.steps < 1:
        raise BadOptionError(f"--steps must be >= 1, got {s.steps}")
    if s.n < 1:
        raise BadOptionError(f"-n must be >= 1, got {s.n}")
    if s.batch_size < 1:
        raise BadOptionError(f"--batch-size must be >= 1, got {s.batch_size}")
    if s.cfg < 0:
        raise BadOptionError(f"--cfg must be >= 0, got {s.cfg}")


def generate(
    eps_model: Callable,
    schedule,
    sample_shape: tuple[int, ...],
    settings: SampleSettings,
    *,
    num_classes: int | None = None,
    null_label: int | None = None,
    cond: torch.Tensor | None = None,
    x_T: torch.Tensor | None = None,
    on_batch: Callable[[int], None] | None = None,
    step_callback: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(samples, labels)``. ``cond`` overrides labels (e.g. encoder hidden states)."""
    from saq_deploy.models.guidance import ClassifierFreeGuidance
    from saq_deploy.samplers.registry import run_sampler

    validate_settings(settings)
    n = settings.n
    labels = None
    if cond is None and num_classes is not None:
        labels = class_labels(n, num_classes, settings.label)
        cond = labels
    elif settings.label is not None and num_classes is None:
        raise ConfigError("--label applies only to class-conditional models")
    model = eps_model
    if cond is not None and settings.cfg != 1.0:
        if null_label is None:
            raise ConfigError("classifier-free guidance needs an unconditional input: this model has no null "
                              "class (saq_model.json) or 'uncond' embedding (--cond-file); use --cfg 1")
        model = ClassifierFreeGuidance(eps_model, settings.cfg, null_label)
    x_T = initial_noise(sample_shape, n, settings.seed) if x_T is None else x_T
    outs = []
    for start in range(0, n, settings.batch_size):
        sl = slice(start, start + settings.batch_size)
        c = None if cond is None else cond[sl]
        outs.append(run_sampler(settings.sampler, model, x_T[sl].clone(), schedule, settings.steps,
                                spacing=settings.spacing, cond=c, callback=step_callback))
        if on_batch is not None:
            on_batch(min(n, start + settings.batch_size))
    return torch.cat(outs), labels
