"""Activation-step initialisation from calibration data, with bounded memory.

Each `ActObserver` keeps, per timestep group, a running max|x|, an exact tail of the largest |x|
(for percentiles) and a uniform reservoir sample of x (for the MSE search): never every
activation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from saq_deploy.errors import ConfigError
from saq_deploy.quant.fake_quant import ActQuantizer
from saq_deploy.quant.quantizer import MSE_CANDIDATES, MSE_NORM, fake_quant, qrange
from saq_deploy.quant.timestep import current_group_ids

logger = logging.getLogger(__name__)

ObserverMethod = Literal["minmax", "percentile", "mse"]
OBSERVER_METHODS: tuple[str, ...] = ("minmax", "percentile", "mse")


class ActObserver:
    """Per-group statistics of one activation tensor and the symmetric steps they imply."""

    def __init__(self, bits: int, groups: int = 1, method: ObserverMethod = "minmax", percentile: float = 99.99,
                 *, tail_size: int = 16384, reservoir_size: int = 16384, seed: int = 0,
                 group_bits: tuple[int, ...] = ()) -> None:
        if method not in OBSERVER_METHODS:
            raise ConfigError(f"observer method must be one of {OBSERVER_METHODS}, got {method!r}")
        if not 0.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (0, 100], got {percentile!r}")
        self.bits, self.groups, self.method, self.percentile = bits, groups, method, percentile
        self.group_bits = tuple(group_bits) or (bits,) * groups  # each group's steps at its own width
        self.tail_size = tail_size if method == "percentile" else 0
        self.reservoir_size = reservoir_size if method == "mse" else 0
        self.seed = seed
        self.count = [0] * groups
        self.amax = [0.0] * groups
        self.tail: list[Tensor | None] = [None] * groups  # descending |x|, at most tail_size
        self.res_keys: list[Tensor | None] = [None] * groups
        self.res_vals: list[Tensor | None] = [None] * groups
        self._gen: torch.Generator | None = None

    @torch.no_grad()
    def observe(self, x: Tensor, group_ids: Tensor | None = None) -> None:
        """Add a batch; `group_ids` (B,) or (1,) routes samples to groups (ignored with one group)."""
        x = x.detach().float()
        if self.groups == 1 or group_ids is None:
            self._update(0, x.reshape(-1))
            return
        ids = group_ids.reshape(-1).to(x.device)
        if ids.numel() == 1:
            self._update(int(ids[0]), x.reshape(-1))
            return
        for g in ids.unique().tolist():
            self._update(int(g), x[ids == g].reshape(-1))

    def _update(self, g: int, flat: Tensor) -> None:
        if flat.numel() == 0:
            return
        a = flat.abs()
        self.count[g] += flat.numel()
        self.amax[g] = max(self.amax[g], float(a.max()))
        if self.tail_size:
            old = self.tail[g]
            if old is not None and old.numel() >= self.tail_size:
                a = a[a > old[-1]]  # only values above the current K-th largest can enter
            merged = a if old is None else torch.cat([old, a])
            self.tail[g] = merged.topk(min(self.tail_size, merged.numel())).values
        if self.reservoir_size:
            # Bottom-k of uniform random keys over everything seen = a uniform sample without replacement.
            if self._gen is None or self._gen.device != flat.device:
                self._gen = torch.Generator(device=flat.device).manual_seed(self.seed)
            keys = torch.rand(flat.numel(), generator=self._gen, device=flat.device)
            keep = keys.topk(min(self.reservoir_size, keys.numel()), largest=False).indices
            k_old, v_old = self.res_keys[g], self.res_vals[g]
            keys, vals = keys[keep], flat[keep]
            if k_old is not None:
                keys, vals = torch.cat([k_old, keys]), torch.cat([v_old, vals])
            keep = keys.topk(min(self.reservoir_size, keys.numel()), largest=False).indices
            self.res_keys[g], self.res_vals[g] = keys[keep], vals[keep]

    def abs_percentile(self, g: int, p: float) -> float:
        """The p-th percentile of |x| (torch.quantile's linear rule); exact while the tail covers it."""
        n, tail = self.count[g], self.tail[g]
        if n == 0 or tail is None:
            raise RuntimeError(f"group {g} has no data")
        pos = p / 100.0 * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        j_lo, j_hi = n - 1 - lo, n - 1 - hi  # ascending rank -> index in the descending tail
        if j_lo >= tail.numel():
            logger.warning("percentile %.4f needs %d top values, tail holds %d: using the tail minimum",
                           p, j_lo + 1, tail.numel())
            return float(tail[-1])
        a_lo, a_hi = float(tail[j_lo]), float(tail[j_hi])
        return a_lo + (pos - lo) * (a_hi - a_lo)

    def _mse_step(self, g: int) -> float:
        """The authors' search: 80 shrink factors of max|x|, L2.4 error on the reservoir sample."""
        bits = self.group_bits[g]
        qmax = qrange(bits)[1]
        sample = self.res_vals[g]
        base = self.amax[g] / qmax
        best, best_err = base, math.inf
        for i in range(MSE_CANDIDATES):
            step = base * (1.0 - 0.01 * i)
            err = float((fake_quant(sample, torch.tensor(step), bits) - sample).abs().pow(MSE_NORM).mean())
            if err < best_err:
                best, best_err = step, err
        return best

    @torch.no_grad()
    def compute_steps(self) -> Tensor:
        """Step per group, (groups,); NaN for a group that saw no data."""
        steps = torch.full((self.groups,), float("nan"))
        for g in range(self.groups):
            qmax = qrange(self.group_bits[g])[1]
            if self.count[g] == 0 or self.amax[g] == 0.0:
                # An all-zero input still needs a positive step; 1.0 keeps zeros exact.
                steps[g] = float("nan") if self.count[g] == 0 else 1.0
                continue
            if self.method == "minmax":
                steps[g] = self.amax[g] / qmax
            elif self.method == "percentile":
                steps[g] = max(self.abs_percentile(g, self.percentile), 1e-12) / qmax
            else:
                steps[g] = self._mse_step(g)
        return steps


def init_act_steps(model: nn.Module, run_batches: Callable[[], None], method: ObserverMethod = "minmax",
                   percentile: float = 99.99, *, tail_size: int = 16384,
                   reservoir_size: int = 16384) -> dict[str, Tensor]:
    """Set every ActQuantizer's step from the data that `run_batches()` feeds through `model`.

    Activation fake-quant is off while observing (each quantizer sees FP inputs); weight
    quantizers are left as they are. With timestep groups the caller must wrap each forward in
    `active_timesteps`. A group that saw no data gets the largest step of the other groups; a
    quantizer that never ran stays uninitialized (pass-through) with a warning. Returns the steps
    set, by quantizer module name.
    """
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}
    observers = {n: ActObserver(m.bits, m.groups, method, percentile, tail_size=tail_size,
                                reservoir_size=reservoir_size, group_bits=m.group_bits)
                 for n, m in quantizers.items()}
    was_enabled = {n: m.enabled for n, m in quantizers.items()}

    def make_hook(obs: ActObserver, groups: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            ids = current_group_ids()
            if groups > 1 and ids is None:
                raise RuntimeError("timestep-grouped activation quantizers need group ids while calibrating: "
                                   "wrap each forward in saq_deploy.quant.active_timesteps(...)")
            obs.observe(args[0], ids)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(observers[n], m.groups)) for n, m in quantizers.items()]
    try:
        for m in quantizers.values():
            m.enabled = False
        with torch.no_grad():
            run_batches()
    finally:
        for h in handles:
            h.remove()
        for n, m in quantizers.items():
            m.enabled = was_enabled[n]

    result: dict[str, Tensor] = {}
    for n, m in quantizers.items():
        steps = observers[n].compute_steps()
        seen = ~torch.isnan(steps)
        if not bool(seen.any()):
            logger.warning("activation quantizer %s saw no data; left uninitialized (pass-through)", n)
            continue
        if not bool(seen.all()):
            logger.warning("activation quantizer %s: timestep groups %s saw no data; using the largest step",
                           n, (~seen).nonzero().flatten().tolist())
            steps = torch.where(seen, steps, steps[seen].max())
        m.set_step(steps)
        result[n] = steps
    return result
