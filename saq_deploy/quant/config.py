"""Quantization configs: frozen dataclasses validated in `__post_init__`, serialisable with a version.

Layer rules are data. `skip` and `keep_8bit` hold fnmatch-style patterns (`*`, `?`, `[seq]`)
matched against the full module name (`down_blocks.1.attentions.0.to_q`). `skip` is checked first,
then `keep_8bit`; the first matching pattern wins. A skipped layer stays FP32; a `keep_8bit` layer
gets INT8 per-channel weights and, if activation quantization is enabled, INT8 activations,
whatever the main spec says. Every other Conv2d/Linear gets the main spec.

Granularity: `WeightSpec.granularity` applies to Linear layers only. Convolutions (1x1 included)
are always per-output-channel, because TensorRT runs INT4 only in front of GEMMs; a W4 conv's
codes lie in [-8, 7] and are exported as INT8 values.

`attention_matmul` (off by default, as in NVIDIA's INT8 recipes) also fake-quantizes the inputs
of the attention matmuls (q, k, v and the softmax probabilities; per tensor, `act.bits`, one step
per timestep group) in every diffusers Attention module not matched by `skip`; it needs
activation quantization enabled.
"""

from __future__ import annotations

import fnmatch
import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from saq_deploy.errors import ConfigError

CONFIG_VERSION = 1
ALLOWED_BITS: tuple[int, ...] = (4, 8)
GRANULARITIES: tuple[str, ...] = ("channel", "block")
BLOCK_SIZES: tuple[int, ...] = (64, 128)
SCALE_METHODS: tuple[str, ...] = ("minmax", "mse")
PRESETS: tuple[str, ...] = ("w8a8", "w4a8", "w4a4")

# NVIDIA's diffusion filter (demoDiffusion / ModelOpt): these stay at 8 bits.
DEFAULT_KEEP_8BIT: tuple[str, ...] = (
    "conv_in",
    "conv_out",
    "time_embedding.*",
    "*time_emb_proj",
    "*conv_shortcut",
    "class_embedding*",
    # cross-attention K/V projections of the text states (diffusers' BasicTransformerBlock.attn2):
    # their input is the same prompt embedding at every step and they are ~2 % of an SD-1.5 UNet's
    # weights, so 4-bit recipes keep them at INT8 per channel (their rounding is still learnt with
    # their transformer block); no UNet2DModel layer matches these names
    "*attn2.to_k",
    "*attn2.to_v",
)

Granularity = Literal["channel", "block"]
LayerRule = Literal["skip", "keep_8bit", "main"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_bits(what: str, bits: Any) -> None:
    if not _is_int(bits) or bits not in ALLOWED_BITS:
        raise ConfigError(f"{what} bits must be one of {ALLOWED_BITS}, got {bits!r}")


@dataclass(frozen=True)
class WeightSpec:
    """Weight quantizer: symmetric INT`bits`, per output channel or (Linear only) per input block."""

    bits: int = 8
    granularity: Granularity = "channel"
    block_size: int | None = None
    scale_method: Literal["minmax", "mse"] = "mse"

    def __post_init__(self) -> None:
        _check_bits("weight", self.bits)
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"weight granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "block":
            if self.block_size not in BLOCK_SIZES or not _is_int(self.block_size):
                raise ConfigError(f"block_size must be one of {BLOCK_SIZES} for block granularity, "
                                  f"got {self.block_size!r}")
            if self.bits != 4:
                raise ConfigError(f"block granularity is for INT4 weights only (TensorRT), got bits={self.bits}")
        elif self.block_size is not None:
            raise ConfigError(f"block_size is only used with granularity='block', got block_size={self.block_size!r}")
        if self.scale_method not in SCALE_METHODS:
            raise ConfigError(f"scale_method must be one of {SCALE_METHODS}, got {self.scale_method!r}")


def _int_tuple(what: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or \
            not all(_is_int(v) for v in value):
        raise ConfigError(f"{what} must be a list of integers, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class ActSpec:
    """Input-activation quantizer: symmetric per-tensor INT`bits`, one step per timestep group.

    `timestep_bounds` (optional, ascending, inside (0, T)): explicit group boundaries, group g
    covering [b_g, b_{g+1}); empty = equal-width groups. `group_bits` (optional, one per group):
    each group's activation bits for the main-spec layers (keep_8bit layers stay at 8 in every
    group); empty = `bits` in every group."""

    bits: int = 8
    timestep_groups: int = 1
    enabled: bool = True
    timestep_bounds: tuple[int, ...] = ()
    group_bits: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_bits("activation", self.bits)
        if not _is_int(self.timestep_groups) or self.timestep_groups < 1:
            raise ConfigError(f"timestep_groups must be an integer >= 1, got {self.timestep_groups!r}")
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"act enabled must be true or false, got {self.enabled!r}")
        bounds = _int_tuple("timestep_bounds", self.timestep_bounds)
        object.__setattr__(self, "timestep_bounds", bounds)
        if bounds and len(bounds) + 1 != self.timestep_groups:
            raise ConfigError(f"timestep_bounds {list(bounds)} make {len(bounds) + 1} groups, "
                              f"but timestep_groups = {self.timestep_groups}")
        if any(b >= c for b, c in itertools.pairwise(bounds)) or (bounds and bounds[0] <= 0):
            raise ConfigError(f"timestep_bounds must be strictly ascending timesteps > 0, got {list(bounds)}")
        gb = _int_tuple("group_bits", self.group_bits)
        object.__setattr__(self, "group_bits", gb)
        if gb and self.timestep_groups == 1:
            raise ConfigError("group_bits needs 2 or more timestep groups; with one, set bits")
        if gb and len(gb) != self.timestep_groups:
            raise ConfigError(f"group_bits {list(gb)} must give one bit width per timestep group "
                              f"({self.timestep_groups})")
        for b in gb:
            _check_bits("group activation", b)

    @property
    def grouping(self):
        """The groups as ``quant.timestep.timestep_groups`` takes them (count + boundaries)."""
        from saq_deploy.quant.timestep import TimestepGroups

        return TimestepGroups(self.timestep_groups, self.timestep_bounds)

    def to_dict(self) -> dict[str, Any]:
        """asdict without the optional keys at their defaults (manifests as before)."""
        data = asdict(self)
        for key in ("timestep_bounds", "group_bits"):
            if data[key]:
                data[key] = list(data[key])
            else:
                data.pop(key)
        return data


@dataclass(frozen=True)
class LayerSpec:
    """What one swapped layer does (resolved from a QuantConfig). `act_bits` None = no act quant."""

    weight_bits: int
    granularity: Granularity
    block_size: int | None
    scale_method: str
    act_bits: int | None
    act_groups: int
    act_group_bits: tuple[int, ...] = ()  # per timestep group (ActSpec.group_bits); () = act_bits in all

    def __post_init__(self) -> None:
        object.__setattr__(self, "act_group_bits", tuple(self.act_group_bits))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not data["act_group_bits"]:  # absent at the default: layer specs as before
            data.pop("act_group_bits")
        else:
            data["act_group_bits"] = list(data["act_group_bits"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSpec:
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"bad layer spec {data!r}: {exc}") from None


def _pattern_tuple(what: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{what} must be a sequence of fnmatch patterns (strings), got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class QuantConfig:
    """Whole-model recipe: main weight/act spec plus per-layer rules (see the module docstring)."""

    weight: WeightSpec = field(default_factory=WeightSpec)
    act: ActSpec = field(default_factory=ActSpec)
    keep_8bit: tuple[str, ...] = DEFAULT_KEEP_8BIT
    skip: tuple[str, ...] = ()
    attention_matmul: bool = False
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.weight, WeightSpec) or not isinstance(self.act, ActSpec):
            raise ConfigError("weight must be a WeightSpec and act an ActSpec")
        # Lists from JSON/TOML become tuples so the config stays hashable.
        object.__setattr__(self, "keep_8bit", _pattern_tuple("keep_8bit", self.keep_8bit))
        object.__setattr__(self, "skip", _pattern_tuple("skip", self.skip))
        if not isinstance(self.attention_matmul, bool):
            raise ConfigError(f"attention_matmul must be true or false, got {self.attention_matmul!r}")
        if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps must be an integer >= 1, got {self.num_train_timesteps!r}")
        if self.act.timestep_groups > self.num_train_timesteps:
            raise ConfigError(f"timestep_groups ({self.act.timestep_groups}) cannot exceed "
                              f"num_train_timesteps ({self.num_train_timesteps})")
        if self.act.timestep_bounds and self.act.timestep_bounds[-1] >= self.num_train_timesteps:
            raise ConfigError(f"timestep_bounds {list(self.act.timestep_bounds)} must lie inside "
                              f"(0, num_train_timesteps = {self.num_train_timesteps})")

    def rule_for(self, name: str) -> LayerRule:
        """'skip', 'keep_8bit' or 'main' for a module name (skip checked first)."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.skip):
            return "skip"
        if any(fnmatch.fnmatchcase(name, p) for p in self.keep_8bit):
            return "keep_8bit"
        return "main"

    def layer_spec(self, name: str, *, is_linear: bool) -> LayerSpec | None:
        """Resolved spec for one Conv2d (is_linear=False) or Linear layer; None = leave FP32."""
        rule = self.rule_for(name)
        if rule == "skip":
            return None
        act_bits = self.act.bits if self.act.enabled else None
        if rule == "keep_8bit":
            return LayerSpec(8, "channel", None, self.weight.scale_method,
                             8 if self.act.enabled else None, self.act.timestep_groups)
        block = is_linear and self.weight.granularity == "block"
        return LayerSpec(self.weight.bits, "block" if block else "channel",
                         self.weight.block_size if block else None, self.weight.scale_method,
                         act_bits, self.act.timestep_groups, self.act.group_bits if self.act.enabled else ())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with a `version` field (for the artifact manifest)."""
        return {
            "version": CONFIG_VERSION,
            "weight": asdict(self.weight),
            "act": self.act.to_dict(),
            "keep_8bit": list(self.keep_8bit),
            "skip": list(self.skip),
            "attention_matmul": self.attention_matmul,
            "num_train_timesteps": self.num_train_timesteps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        data = dict(data)
        version = data.pop("version", None)
        if version != CONFIG_VERSION:
            raise ConfigError(f"unsupported quant config version {version!r}; this build reads {CONFIG_VERSION}")
        allowed = {"weight", "act", "keep_8bit", "skip", "attention_matmul", "num_train_timesteps"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"unknown quant config keys {unknown}; allowed: {sorted(allowed)}")
        try:
            if "weight" in data:
                data["weight"] = WeightSpec(**data["weight"])
            if "act" in data:
                data["act"] = ActSpec(**data["act"])
        except TypeError as exc:
            raise ConfigError(f"bad weight/act spec: {exc}") from None
        return cls(**data)


def preset(bits: str) -> QuantConfig:
    """Named recipes: "w8a8" (deployable INT8), "w4a8" (INT4 Linear blocks of 64, INT4 per-channel
    convs, INT8 activations), "w4a4" (fake-quant research mode; per-channel INT4 weights)."""
    key = bits.lower() if isinstance(bits, str) else bits
    if key == "w8a8":
        return QuantConfig(WeightSpec(bits=8), ActSpec(bits=8))
    if key == "w4a8":
        return QuantConfig(WeightSpec(bits=4, granularity="block", block_size=64), ActSpec(bits=8))
    if key == "w4a4":
        return QuantConfig(WeightSpec(bits=4), ActSpec(bits=4))
    raise ConfigError(f"unknown preset {bits!r}; choose one of {PRESETS}")
