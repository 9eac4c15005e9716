"""Calibration recipes: TOML files in calibration/, validated once, overridable from the CLI.

Schema (every key optional; defaults below)::

    [model]           spec = "builtin:digits"
    [quant]           bits = "w8a8"            # w8a8 | w4a8 | w4a4
                      act_timestep_groups = 1   # >1: one activation step per timestep group
                      act_timestep_bounds = []  # ascending t inside (0, T): groups [0, b1), [b1, b2), ..
                      act_group_bits = []       # one of 4 | 8 per group (default: the bits' activations)
                      weight_block_size = 64    # 4-bit Linear weights: 64 | 128 | 0 (per channel)
                      act_observer = "auto"     # brecq/sa-ptq initial act steps: auto (minmax for
                                                # 8-bit acts, mse for 4-bit) | minmax | percentile | mse
                      attention_matmul = false  # also quantize attention matmul inputs (q, k, v, probs)
    [calibration]     method = "sa-ptq"        # minmax | percentile | mse | brecq | sa-ptq | sa-qlora | qlora-mse
                      sampler = "dpm-solver-2" # dpm-solver-2 | plms | ddim (data collection)
                      steps = 10, spacing = "quadratic", num_samples = 64, cfg = 1.5, seed = 0
                      orientation = "outer_to_intermediate"   # or intermediate_to_outer (ablation)
                      mota_weight = 1.0  # MOTA methods: target (1-w) FP(student's point) + w FP(target point)
    [reconstruction]  iters = 300, batch_size = 32, lr_round = 1e-2, lr_act = 1e-3 (relative),
                      round_weight = 0.01, beta_start = 20.0, beta_end = 2.0, warmup = 0.2,
                      cos_weight = 0.0, max_inputs = 2048,
                      network_iters = 0  # brecq / sa-ptq: then train all blocks on the final eps
                      network_lr_scale = 10.0  # that stage's lr_round / lr_act factor
    [qlora]           (methods sa-qlora / qlora-mse) rank = 32, alpha = 32.0, lr = 4e-4 (LoRA, relative
                      to each layer's mean weight scale), lr_scale = 1e-4, lr_act = 1e-3 (relative),
                      epochs = 20, mixstep = [5, 10, 20], cos_weight = 2.0, batch_size = 8,
                      seed = 3407, teacher = "auto",  # auto | dpm-solver-2 | ddim
                      step_weight = "uniform"         # uniform | state (x max(1, DDIM eps gain^2))
    [prompts]         (cross-attention UNet2DConditionModel only) embeddings_file = "emb.safetensors":
                      'cond' (P, L, D) prompt embeddings cycled over the samples, 'uncond' (1, L, D)
                      the negative prompt's (needed when calibration.cfg != 1); or prompts = [...]
                      and/or prompts_file (one per line), negative_prompt = "" through the
                      pipeline's own tokenizer + text encoder (the `text` extra: transformers)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from saq_deploy.calibrate.methods import METHOD_NAMES, get_method
from saq_deploy.errors import BadOptionError, ConfigError

METHODS = METHOD_NAMES  # the registry in calibrate.methods owns the names
BITS = ("w8a8", "w4a8", "w4a4")
DATA_SAMPLERS = ("dpm-solver-2", "plms", "ddim")
ORIENTATIONS = ("outer_to_intermediate", "intermediate_to_outer")
NETWORK_LR_SCALE = 10.0  # reconstruction.network_lr_scale's default (dropped from to_dict there)


def _choice(value: Any, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{what} = {value!r} is not supported; choose one of: {', '.join(allowed)}")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_types(section: str, sec_cls: type, values: dict) -> None:
    """TOML gives str/int/float/bool/list: check them against the field types here, so a quoted
    number (``seed = "0"``) is one line naming the key rather than a TypeError deep in a run."""
    hints = get_type_hints(sec_cls)
    for name, value in values.items():
        want = hints[name]
        if want is bool:
            ok = isinstance(value, bool)
        elif want is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif want is str:
            ok = isinstance(value, str)
        else:  # tuple[int, ...] (qlora.mixstep): its section checks it with a fuller message
            ok = True
        if not ok:
            expected = _TYPE_NAMES[want]
            hint = "; TOML numbers are written without quotes" if want in (int, float) and \
                isinstance(value, str) else ""
            raise ConfigError(f"recipe key {section}.{name} must be {expected}, got {value!r} "
                              f"({type(value).__name__}){hint}")


@dataclass(frozen=True)
class ModelSection:
    spec: str = "builtin:digits"


@dataclass(frozen=True)
class QuantSection:
    bits: str = "w8a8"
    act_timestep_groups: int = 1
    weight_block_size: int = 64  # 4-bit Linear / 1x1 weights: INT4 blocks along the input dim; 0 = per channel
    act_observer: str = "auto"  # reconstruction methods' initial activation steps
    attention_matmul: bool = False  # also fake-quantize q, k, v and softmax probs (research; off like NVIDIA's INT8)
    # explicit group boundaries (groups = len + 1, group g = [b_g, b_{g+1})) and per-group activation
    # bits (docs/design/deployment.md §7.1); empty: equal-width groups, every group at the bits' width
    act_timestep_bounds: tuple[int, ...] = ()
    act_group_bits: tuple[int, ...] = ()

    @property
    def groups(self) -> int:
        """The number of activation timestep groups (the bounds' count + 1 when bounds are given)."""
        return len(self.act_timestep_bounds) + 1 if self.act_timestep_bounds else self.act_timestep_groups

    def __post_init__(self) -> None:
        _choice(self.bits, BITS, "quant.bits")
        _choice(self.act_observer, ("auto", "minmax", "percentile", "mse"), "quant.act_observer")
        if not isinstance(self.attention_matmul, bool):
            raise ConfigError(f"quant.attention_matmul must be true or false, got {self.attention_matmul!r}")
        if self.weight_block_size not in (0, 64, 128):
            raise ConfigError(f"quant.weight_block_size = {self.weight_block_size!r}: TensorRT INT4 blocks "
                              "are 64 or 128 (0 = per-channel INT4)")
        if not isinstance(self.act_timestep_groups, int) or self.act_timestep_groups < 1:
            raise ConfigError(f"quant.act_timestep_groups must be an integer >= 1, got {self.act_timestep_groups!r}")
        b, bits = self.act_timestep_bounds, self.act_group_bits
        for key, v in (("act_timestep_bounds", b), ("act_group_bits", bits)):
            if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or \
                    not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ConfigError(f"quant.{key} must be a list of integers, got {v!r}")
        object.__setattr__(self, "act_timestep_bounds", tuple(b))
        object.__setattr__(self, "act_group_bits", tuple(bits))
        if b and (b[0] <= 0 or any(x >= y for x, y in itertools.pairwise(b))):
            raise ConfigError(f"quant.act_timestep_bounds must be strictly ascending timesteps inside (0, T), "
                              f"got {list(b)}")
        if b and self.act_timestep_groups not in (1, len(b) + 1):
            raise ConfigError(f"quant.act_timestep_bounds {list(b)} make {len(b) + 1} groups but "
                              f"quant.act_timestep_groups = {self.act_timestep_groups}: set one of them")
        if bits and self.groups == 1:
            raise ConfigError("quant.act_group_bits needs 2 or more timestep groups (quant.act_timestep_bounds or "
                              "act_timestep_groups); with one group, quant.bits sets the activation width")
        if bits and len(bits) != self.groups:
            raise ConfigError(f"quant.act_group_bits {list(bits)} needs one bit width per timestep group "
                              f"({self.groups})")
        if any(x not in (4, 8) for x in bits):
            raise ConfigError(f"quant.act_group_bits must hold 4 or 8 per group, got {list(bits)}")


@dataclass(frozen=True)
class CalibrationSection:
    method: str = "sa-ptq"
    sampler: str = "dpm-solver-2"
    steps: int = 10
    spacing: str = "quadratic"
    num_samples: int = 64
    cfg: float = 1.5
    seed: int = 0
    orientation: str = "outer_to_intermediate"
    # w of the blended MOTA target (1 - w) FP(student's point) + w FP(the other-order point); 1 = MOTA
    mota_weight: float = 1.0

    def __post_init__(self) -> None:
        _choice(self.method, METHODS, "calibration.method")
        _choice(self.sampler, DATA_SAMPLERS, "calibration.sampler")
        _choice(self.orientation, ORIENTATIONS, "calibration.orientation")
        for name in ("steps", "num_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"calibration.{name} must be an integer >= 1, got {v!r}")
        m = get_method(self.method)
        w = self.mota_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
            raise ConfigError(f"calibration.mota_weight must be a number in [0, 1], got {w!r}")
        if w != 1.0 and not m.mota:
            raise ConfigError(f"calibration.mota_weight applies to MOTA methods only, not '{m.name}' "
                              "(its target is already the student's own point)")
        if m.mota and m.reconstructs and self.sampler == "ddim":
            raise ConfigError(f"calibration.method = '{m.name}' needs a higher-order data sampler "
                              "(dpm-solver-2 or plms); 'ddim' gives same-point targets (use brecq)")


@dataclass(frozen=True)
class ReconstructionSection:
    iters: int = 300
    batch_size: int = 32
    lr_round: float = 1e-2
    lr_act: float = 1e-3  # relative to each activation step's initial value
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    cos_weight: float = 0.0
    max_inputs: int = 2048  # block inputs kept in memory per block (a seeded subset if more)
    # network stage (calibrate.network_stage): after the blocks, this many iterations training every
    # block's rounding and steps jointly on the UNet's final eps; 0 = off (block-wise only)
    network_iters: int = 0
    # the stage starts AdaRound at the decided codes (h near 0 or 1), not at the fractional part: a flip
    # must carry h across 0.5 from the edge, so it needs larger rates than a block to move at all in a
    # few hundred iterations (tiny UNet, 100 iterations: x1 and x3 left the loss where it was, x10 cut
    # it by 20-45 %; docs/design/method.md §4.1)
    network_lr_scale: float = NETWORK_LR_SCALE  # the stage's lr_round and lr_act = the block stage's x this

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size", "max_inputs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"reconstruction.{name} must be an integer >= 1, got {v!r}")
        k = self.network_iters
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ConfigError(f"reconstruction.network_iters must be an integer >= 0 (0 = no network stage), "
                              f"got {k!r}")
        v = self.network_lr_scale
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"reconstruction.network_lr_scale must be a finite number > 0, got {v!r}")
        for name in ("lr_round", "lr_act", "round_weight", "beta_start", "beta_end", "cos_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"reconstruction.{name} must be a finite number >= 0, got {v!r}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"reconstruction.warmup must be in [0, 1), got {self.warmup!r}")


@dataclass(frozen=True)
class QLoRASection:
    """SA-QLoRA / QLoRA-MSE fine-tuning (docs/design/method.md §5; `saq_deploy.calibrate.qlora`)."""

    rank: int = 32
    alpha: float = 32.0  # LoRA scaling alpha / rank
    lr: float = 4e-4  # LoRA factors, times each layer's mean weight scale (the authors: mean step / 2500)
    lr_scale: float = 1e-4  # weight scales, relative to each layer's mean scale
    lr_act: float = 1e-3  # activation steps, relative to each quantizer's largest step
    epochs: int = 20  # one epoch = one fresh teacher pass per mixstep step count
    mixstep: tuple[int, ...] = (5, 10, 20)  # step counts cycled every epoch (the authors: 100/50/20/10)
    cos_weight: float = 2.0  # lambda of the (1 - cos) term; the authors' 100 scaled by 256/12288 elements
    batch_size: int = 8  # x_T per teacher pass (the UNet sees 2x with CFG)
    seed: int = 3407  # LoRA init and the per-epoch x_T / labels (the authors' 3407 + epoch)
    teacher: str = "auto"  # FP trajectory: auto = dpm-solver-2 for sa-qlora, ddim for qlora-mse
    step_weight: str = "uniform"  # uniform (the authors) | state: weight each step by the sampler's eps gain
    # two-stage SA-QLoRA (the authors' retrain script): the first k epochs train towards the FP eps at
    # the student's own point of the same trajectory (same order), the rest towards the MOTA target
    same_point_epochs: int = 0

    def __post_init__(self) -> None:
        mix = self.mixstep
        if isinstance(mix, int) or not isinstance(mix, (list, tuple)) or not mix or \
                not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in mix):
            raise ConfigError(f"qlora.mixstep must be a non-empty list of step counts >= 1, got {mix!r}")
        object.__setattr__(self, "mixstep", tuple(mix))
        for name in ("rank", "epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"qlora.{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"qlora.seed must be an integer >= 0, got {self.seed!r}")
        k = self.same_point_epochs
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < self.epochs:
            raise ConfigError(f"qlora.same_point_epochs must be an integer in 0..epochs-1 ({self.epochs - 1}), "
                              f"got {k!r}")
        for name in ("alpha", "lr", "lr_scale", "lr_act", "cos_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"qlora.{name} must be a finite number >= 0, got {v!r}")
        _choice(self.teacher, ("auto", "dpm-solver-2", "ddim"), "qlora.teacher")
        _choice(self.step_weight, ("uniform", "state"), "qlora.step_weight")


@dataclass(frozen=True)
class PromptsSection:
    """Text conditioning for cross-attention UNets (`saq_deploy.calibrate.prompts` reads it)."""

    embeddings_file: str = ""  # safetensors: cond (P, L, D), optional uncond (1, L, D)
    prompts: tuple[str, ...] = ()  # inline prompts (through the pipeline's text encoder)
    prompts_file: str = ""  # one prompt per line (same)
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        ps = self.prompts
        if isinstance(ps, str) or not isinstance(ps, (list, tuple)) or not all(isinstance(p, str) for p in ps):
            raise ConfigError(f"prompts.prompts must be a list of strings, got {ps!r}")
        object.__setattr__(self, "prompts", tuple(ps))

    @property
    def empty(self) -> bool:
        return self == PromptsSection()


@dataclass(frozen=True)
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    quant: QuantSection = field(default_factory=QuantSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    reconstruction: ReconstructionSection = field(default_factory=ReconstructionSection)
    qlora: QLoRASection = field(default_factory=QLoRASection)
    prompts: PromptsSection = field(default_factory=PromptsSection)

    def __post_init__(self) -> None:
        m = get_method(self.calibration.method)
        if self.qlora.same_point_epochs and not (m.fine_tunes and m.mota):
            raise ConfigError(f"qlora.same_point_epochs is the first stage of a two-stage sa-qlora run; "
                              f"method '{m.name}' has one target throughout: leave it at 0")
        r = self.reconstruction
        if (r.network_iters or r.network_lr_scale != NETWORK_LR_SCALE) and not m.reconstructs:
            raise ConfigError(f"reconstruction.network_iters / network_lr_scale are the network stage of block "
                              f"reconstruction (brecq, sa-ptq); method '{m.name}' reconstructs no blocks: "
                              "leave them at their defaults")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        # keys added later leave recipe.json (and so the recipe hash) as before while at their default
        if data["calibration"]["mota_weight"] == 1.0:
            data["calibration"].pop("mota_weight")
        for key, default in (("network_iters", 0), ("network_lr_scale", NETWORK_LR_SCALE)):
            if data["reconstruction"][key] == default:
                data["reconstruction"].pop(key)
        for key in ("act_timestep_bounds", "act_group_bits"):  # absent at the default: hash as before
            if data["quant"][key]:
                data["quant"][key] = list(data["quant"][key])
            else:
                data["quant"].pop(key)
        if data["qlora"]["same_point_epochs"] == 0:
            data["qlora"].pop("same_point_epochs")
        if not get_method(self.calibration.method).fine_tunes:
            # other methods ignore [qlora]: leaving it out keeps their recipe.json and hash as before
            data.pop("qlora")
        if self.prompts.empty:  # class / unconditional recipes: recipe.json and hash as before
            data.pop("prompts")
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise ConfigError(f"unknown recipe section(s): {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sections)}")
        kwargs = {}
        for name, sec_cls in ((f.name, f.default_factory) for f in dataclasses.fields(cls)):
            values = data.get(name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"recipe section [{name}] must be a table")
            known = {f.name for f in dataclasses.fields(sec_cls)}
            bad = set(values) - known
            if bad:
                raise ConfigError(f"unknown key(s) in [{name}]: {', '.join(sorted(bad))}; "
                                  f"known: {', '.join(sorted(known))}")
            _check_types(name, sec_cls, values)
            kwargs[name] = sec_cls(**values)
        return cls(**kwargs)

    def with_overrides(self, overrides: dict[str, Any]) -> Recipe:
        """``{"calibration.method": "brecq", ...}``: dotted keys, None values ignored."""
        data = dataclasses.asdict(self)
        for key, value in overrides.items():
            if value is None:
                continue
            section, _, name = key.partition(".")
            if section not in data or name not in data[section]:
                raise ConfigError(f"unknown recipe override {key!r}")
            data[section][name] = value
        try:
            return Recipe.from_dict(data)
        except BadOptionError:
            raise
        except ConfigError as e:  # this recipe was valid before: the command-line value is wrong (exit 2)
            raise BadOptionError(f"{e} (set by a command-line option)") from None


def quant_config_for(recipe: Recipe, num_train_timesteps: int):
    """The fake-quant config a recipe asks for (preset by bits, then the recipe's quant keys)."""
    import dataclasses

    from saq_deploy.quant.config import preset

    cfg = preset(recipe.quant.bits)
    q = recipe.quant
    if q.act_timestep_bounds and q.act_timestep_bounds[-1] >= num_train_timesteps:
        raise ConfigError(f"quant.act_timestep_bounds {list(q.act_timestep_bounds)} must lie inside (0, T): "
                          f"this model's scheduler has T = {num_train_timesteps} timesteps")
    act = dataclasses.replace(cfg.act, timestep_groups=q.groups, timestep_bounds=q.act_timestep_bounds,
                              group_bits=q.act_group_bits)
    weight = cfg.weight
    if weight.bits == 4:  # 4-bit Linear weights: INT4 blocks (TensorRT GEMM rule) or per channel
        bs = recipe.quant.weight_block_size
        weight = dataclasses.replace(weight, granularity="block" if bs else "channel", block_size=bs or None)
    if (scale := get_method(recipe.calibration.method).weight_scale) is not None:  # ModelOpt: "max"
        weight = dataclasses.replace(weight, scale_method=scale)
    return dataclasses.replace(cfg, weight=weight, act=act, num_train_timesteps=num_train_timesteps,
                               attention_matmul=recipe.quant.attention_matmul)


def load_recipe(path: str | Path | None) -> Recipe:
    if path is None:
        return Recipe()
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"recipe '{path}' is a folder; pass a recipe file (e.g. calibration/digits_w8a8_sa-ptq.toml)")
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' does not exist (recipes live in calibration/*.toml)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe '{path}' is not valid TOML: {e}") from e
    return Recipe.from_dict(data)
