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
from typing import Self

import torch
from torch import Tensor

from saq_deploy.errors import ConfigError

_GROUP_IDS: ContextVar[Tensor | None] = ContextVar("saq_timestep_group_ids", default=None)


class TimestepGroups(int):
    """K timestep groups (an int: ``range(groups)``, ``groups > 1`` keep working) that may carry
    explicit boundaries: ``bounds`` = (b_1, ..., b_{K-1}) ascending inside (0, T), group g covering
    [b_g, b_{g+1}) (b_0 = 0, b_K = T). Empty bounds: the equal-width groups. Built from a quant
    config (``QuantConfig.act.grouping`` or ``from_quant_config`` on a manifest's dict) and passed
    where a group count is, so every caller of ``timestep_groups`` assigns by the same boundaries."""

    bounds: tuple[int, ...]

    def __new__(cls, groups: int, bounds=()) -> Self:
        obj = super().__new__(cls, int(groups))
        obj.bounds = tuple(int(b) for b in bounds)
        if obj.bounds and len(obj.bounds) != int(obj) - 1:
            raise ConfigError(f"{len(obj.bounds)} timestep boundaries for {int(obj)} groups (need groups - 1)")
        return obj

    def __reduce__(self):
        return (TimestepGroups, (int(self), self.bounds))

    def __repr__(self) -> str:
        return f"TimestepGroups({int(self)}, bounds={list(self.bounds)})" if self.bounds else repr(int(self))

    @classmethod
    def from_quant_config(cls, data: dict) -> TimestepGroups:
        """The groups of a stored quant config (``manifest["quant_config"]``)."""
        act = data.get("act", {})
        return cls(int(act.get("timestep_groups", 1)), act.get("timestep_bounds", ()))

    def t_ranges(self, num_train_timesteps: int) -> list[list[float]]:
        """[lo, hi) of each group, as ``timestep_groups`` assigns them."""
        k, T = int(self), num_train_timesteps
        if self.bounds:
            edges = [0, *self.bounds, T]
            return [[edges[g], edges[g + 1]] for g in range(k)]
        return [[g * T / k, (g + 1) * T / k] for g in range(k)]

    def assign_rule(self) -> str:
        """The rule in words (export / engine manifests)."""
        if self.bounds:
            return f"group = number of bounds {list(self.bounds)} <= t (t clamped to [0, num_train_timesteps))"
        return "group = clamp(floor(t * groups / num_train_timesteps), 0, groups - 1)"


def timestep_groups(timesteps: Tensor | float, num_groups: int, num_train_timesteps: int) -> Tensor:
    """Group id per sample, (B,) int64: equal-width groups over [0, T), or the explicit boundaries
    of a :class:`TimestepGroups` passed as ``num_groups`` (t in [b_g, b_{g+1}) -> g).

    Equal width: group g covers [g*T/G, (g+1)*T/G). Values outside [0, T) are clamped to the
    first/last group. A scalar timestep gives shape (1,) (it broadcasts over the batch).
    """
    if num_groups < 1 or num_train_timesteps < 1:
        raise ConfigError(f"num_groups and num_train_timesteps must be >= 1, got {num_groups}, {num_train_timesteps}")
    t = torch.as_tensor(timesteps).reshape(-1).to(torch.float64)
    bounds = getattr(num_groups, "bounds", ())
    if bounds:
        edges = torch.tensor(bounds, dtype=torch.float64)
        return torch.searchsorted(edges, t.contiguous(), right=True).to(torch.long)
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
