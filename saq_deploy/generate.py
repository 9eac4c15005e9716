"""Generate samples: seeded noise -> (optional CFG) -> a named sampler over any EpsModel.

This is the one sampling driver used by the CLI, calibration and validation, whatever backend
implements the EpsModel (PyTorch FP32, fake-quant, ONNX Runtime, TensorRT)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)  # the last batch may be short


def batch_rows(n: int, batch_size: int, batches: range | None = None) -> range:
    """The sample rows that batches ``batches`` (default: all) of an ``n``-sample run cover."""
    total = num_batches(n, batch_size)
    batches = range(total) if batches is None else batches
    if batches.step != 1 or not 0 <= batches.start <= batches.stop <= total:
        raise ConfigError(f"batches must be a contiguous range of batch indices within 0..{total}, got {batches}")
    return range(min(n, batches.start * batch_size), min(n, batches.stop * batch_size))


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
    timesteps: torch.Tensor | Sequence[float] | None = None,
    batches: range | None = None,
    step_callback_for: Callable[[slice, torch.Tensor | None], Callable | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(samples, labels)``. ``cond`` overrides labels (e.g. encoder hidden states).

    ``timesteps``: an explicit grid (``settings.steps + 1`` points) instead of the sampler's default
    one for ``settings.spacing``; see :func:`~saq_deploy.samplers.registry.run_sampler`.

    ``batches``: compute only these batches (a contiguous range of batch indices, e.g. one
    distributed rank's share); the result holds just their rows (:func:`batch_rows`). x_T and
    labels are still drawn for all ``settings.n`` samples, so a row never depends on the split.
    ``step_callback_for(rows, cond)``: instead of ``step_callback``, called before each batch with
    its rows (a slice of the ``n`` samples) and their cond; returns that batch's step callback (a
    recorder needs to know which samples a step belongs to). ``on_batch(done)``: rows done so far."""
    from saq_deploy.models.guidance import ClassifierFreeGuidance
    from saq_deploy.samplers.registry import run_sampler

    validate_settings(settings)
    if step_callback is not None and step_callback_for is not None:
        raise ConfigError("pass step_callback or step_callback_for, not both")
    n, bs = settings.n, settings.batch_size
    rows = batch_rows(n, bs, batches)
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
    for start in range(rows.start, rows.stop, bs):
        sl = slice(start, min(n, start + bs))
        c = None if cond is None else cond[sl]
        callback = step_callback if step_callback_for is None else step_callback_for(sl, c)
        outs.append(run_sampler(settings.sampler, model, x_T[sl].clone(), schedule, settings.steps,
                                spacing=settings.spacing, cond=c, callback=callback, timesteps=timesteps))
        if on_batch is not None:
            on_batch(sl.stop - rows.start)
    picked = None if labels is None else labels[rows.start:rows.stop]
    return (torch.cat(outs) if outs else x_T[:0]), picked  # no batches (a rank with none): no rows
