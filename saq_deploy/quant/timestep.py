"""Timestep-group context for per-group activation steps.

A static Q/DQ graph has one scale per tensor, so per-timestep activation scales are deployable
only as a few timestep groups (one engine per group). Activation quantizers with more than one
group read the per-sample group ids from a context variable that the caller (calibration loop,
model wrapper, exporter) sets around every forward:

    with active_timesteps(timestep_groups(t, num_groups, 1000)):
        eps = unet(x, t).sample
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from saq_deploy.errors import ConfigError

_GROUP_IDS: ContextVar[Tensor | None] = ContextVar("saq_timestep_group_ids", default=None)


def timestep_groups(timesteps: Tensor | float, num_groups: int, num_train_timesteps: int) -> Tensor:
    """Group id per sample, (B,) int64: equal-width groups over [0, T).

    Group g covers [g*T/G, (g+1)*T/G); values outside [0, T) are clamped to the first/last group.
    A scalar timestep gives shape (1,) (it broadcasts over the batch).
    """
    if num_groups < 1 or num_train_timesteps < 1:
        raise ConfigError(f"num_groups and num_train_timesteps must be >= 1, got {num_groups}, {num_train_timesteps}")
    t = torch.as_tensor(timesteps).reshape(-1).to(torch.float64)
    ids = torch.floor(t * num_groups / num_train_timesteps).to(torch.long)
    return ids.clamp_(0, num_groups - 1)


@contextmanager
def active_timesteps(group_ids: Tensor) -> Iterator[Tensor]:
    """Make `group_ids` (B,) or (1,) visible to activation quantizers inside the block."""
    ids = torch.as_tensor(group_ids).reshape(-1).to(torch.long)
    token = _GROUP_IDS.set(ids)
    try:
        yield ids
    finally:
        _GROUP_IDS.reset(token)


def current_group_ids() -> Tensor | None:
    """The group ids set by the innermost `active_timesteps`, or None outside one."""
    return _GROUP_IDS.get()
