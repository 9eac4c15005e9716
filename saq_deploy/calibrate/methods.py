"""Calibration methods: one registry, one small entry per method.

Each entry says what data the method needs, how it runs and what it aligns to; the pipeline asks
the entry instead of comparing method names (``calibrate.run.calibrate`` is the one dispatch
point on ``runner``). A new method is one entry here plus one recipe; a new way of running
(say, network-level reconstruction) is one new ``runner`` value handled in ``run.py``.

Kept free of torch imports: the recipe layer validates names against this module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from saq_deploy.errors import ConfigError

# how a method runs (``run.calibrate`` dispatches on this):
#   observer       activation steps from an observer over the calibration data, nearest rounding
#   reconstruction block-wise AdaRound + activation-step learning (calibrate.reconstruct)
#   qlora          LoRA fine-tuning of the fake-quant network on FP sampler targets (calibrate.qlora)
#   modelopt       NVIDIA ModelOpt's own INT8 calibration (calibrate.modelopt_baseline)
RUNNERS = ("observer", "reconstruction", "qlora", "modelopt")


def _modelopt_missing() -> str | None:
    from saq_deploy.calibrate.modelopt_baseline import INSTALL_HINT, modelopt_available

    return None if modelopt_available() else f"method 'modelopt-int8' needs NVIDIA ModelOpt: {INSTALL_HINT}"


@dataclass(frozen=True)
class Method:
    name: str
    runner: str
    summary: str
    # observer baselines fix their activation observer; None: the recipe's quant.act_observer
    act_observer: str | None = None
    # Mixed-Order Trajectory Alignment: the quantized first-order step is trained towards the FP
    # network's direction at the higher-order sampler's intermediate point (needs such a sampler)
    mota: bool = False
    weight_scale: str | None = None  # overrides the preset's weight-scale method
    only_bits: tuple[str, ...] | None = None  # None: every bit width
    missing: Callable[[], str | None] | None = None  # why it cannot run here (a missing package)
    auto: bool = True  # a candidate of `calibrate --method auto` (where its bits and packages allow)

    @property
    def reconstructs(self) -> bool:
        return self.runner == "reconstruction"

    @property
    def fine_tunes(self) -> bool:
        return self.runner == "qlora"

    def available(self, bits: str) -> bool:
        return (self.only_bits is None or bits in self.only_bits) and (self.missing is None or self.missing() is None)

    def check(self, bits: str) -> None:
        """Raise if the method cannot run for ``bits`` or on this machine (before any work)."""
        if self.only_bits is not None and bits not in self.only_bits:
            raise ConfigError(f"method '{self.name}' supports {', '.join(self.only_bits)} only, not {bits}: "
                              f"use --bits {self.only_bits[0]} or another method")
        if self.missing is not None and (why := self.missing()) is not None:
            from saq_deploy.errors import BackendUnavailableError

            raise BackendUnavailableError(why)


_ALL = (
    Method("minmax", "observer", "activation ranges = observed min/max", act_observer="minmax"),
    Method("percentile", "observer", "activation ranges = 99.99th percentile", act_observer="percentile",
           auto=False),  # minmax and mse bracket it; one observer fewer keeps auto's budget for training
    Method("mse", "observer", "activation ranges minimising the quantization MSE", act_observer="mse"),
    Method("brecq", "reconstruction", "block reconstruction towards the FP output at the same point"),
    Method("sa-ptq", "reconstruction", "block reconstruction with the MOTA target (SA-PTQ)", mota=True),
    Method("modelopt-int8", "modelopt", "NVIDIA ModelOpt INT8 (max calibration)", weight_scale="minmax",
           only_bits=("w8a8",), missing=_modelopt_missing),
    Method("sa-qlora", "qlora", "LoRA fine-tuning with the MOTA target (SA-QLoRA)", mota=True),
    Method("qlora-mse", "qlora", "LoRA fine-tuning towards the FP output at the same point"),
)
METHODS: dict[str, Method] = {m.name: m for m in _ALL}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
# how `--method auto` / `--compare` rank candidates (calibrate.compare): distance of the final samples
# to FP's at the same sampler, or to FP's higher-order sampler's (MOTA's target)
CRITERIA = ("fp", "fp-higher-order")
AUTO = "auto"  # `--method auto`: compare the candidates below on the user's model (calibrate.compare)
_COST_ORDER = {r: i for i, r in enumerate(("observer", "modelopt", "reconstruction", "qlora"))}


def auto_candidates(bits: str) -> tuple[str, ...]:
    """The methods `--method auto` compares for ``bits``, cheapest first (a budget cuts the tail);
    LoRA fine-tuning only below 8-bit weights, where rounding alone leaves quality on the table."""
    ms = [m for m in _ALL if m.auto and m.available(bits) and (m.runner != "qlora" or bits != "w8a8")]
    return tuple(m.name for m in sorted(ms, key=lambda m: _COST_ORDER[m.runner]))


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"calibration.method = {name!r} is not supported; choose one of: "
                          f"{', '.join(METHOD_NAMES)}") from None
