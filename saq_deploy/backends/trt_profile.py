"""TensorRT build profiles: TOML files in ``engines/profiles/``, validated once into a frozen dataclass.

Schema (every key optional; defaults in :class:`BuildProfile`)::

    name = "digits"              # engine folder suffix; default: the file's stem
    description = "..."
    [batch]    min = 1, opt = 16, max = 64
               cfg = true        # double min/opt/max: CFG runs [uncond; cond] as one engine call
    [shapes]   sample = [1, 16, 16]               # C, H, W; checked against the model (default: the model's)
               encoder_hidden_states = [77, 768]  # L, D for cross-attention UNets
               text_embeds = [1280]               # E, SDXL-class UNets' pooled text embeddings
               time_ids = [6]                     # SDXL-class UNets' size / crop conditioning
    [build]    precision = "fp16"                 # fp16: the FP16-typed ONNX; fp32: the FP32-typed one
               optimization_level = 3             # TensorRT builder optimization level 0..5
               workspace_mib = 4096               # workspace memory-pool limit
               timing_cache = "engines/timing.cache"   # "" = no timing cache
               version_compatible = false         # embed the lean runtime (forward-compatible plans)
               tf32 = true                        # TF32 for FP32 layers (false for FP32 parity checks)
    [runtime]  cuda_graph = false                 # capture one CUDA graph per batch size at run time

Everything here is pure Python: no TensorRT import.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saq_deploy.errors import ConfigError

PRECISIONS = ("fp16", "fp32")
ONNX_FOR_PRECISION = {"fp16": "model.fp16.onnx", "fp32": "model.onnx"}
DEFAULT_TIMING_CACHE = "engines/timing.cache"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# TOML section -> {key: dataclass field}
_SCHEMA: dict[str, dict[str, str]] = {
    "batch": {"min": "min_batch", "opt": "opt_batch", "max": "max_batch", "cfg": "cfg"},
    "shapes": {"sample": "sample", "encoder_hidden_states": "encoder_hidden_states",
               "text_embeds": "text_embeds", "time_ids": "time_ids"},
    "build": {"precision": "precision", "optimization_level": "optimization_level",
              "workspace_mib": "workspace_mib", "timing_cache": "timing_cache",
              "version_compatible": "version_compatible", "tf32": "tf32"},
    "runtime": {"cuda_graph": "cuda_graph"},
}
_TOP = ("name", "description")
_SHAPE_FIELDS = tuple(_SCHEMA["shapes"].values())
# profile shapes of the conditioning inputs -> what a model without that input lacks
_COND_SHAPES = {"encoder_hidden_states": "cross-attention input",
                "text_embeds": "SDXL-class added conditioning (text_embeds)",
                "time_ids": "SDXL-class added conditioning (time_ids)"}


def _int(value: Any, what: str, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{what} must be {rng}, got {value}")


def _bool(value: Any, what: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, got {value!r}")


def _dims(value: Any, what: str, n: int) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or len(value) != n:
        raise ConfigError(f"{what} must be a list of {n} positive integers, got {list(value) if isinstance(value, tuple) else value!r}")
    for v in value:
        _int(v, what, 1)


@dataclass(frozen=True)
class BuildProfile:
    name: str = "default"
    description: str = ""
    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = 16
    cfg: bool = True
    sample: tuple[int, ...] | None = None
    encoder_hidden_states: tuple[int, ...] | None = None
    text_embeds: tuple[int, ...] | None = None
    time_ids: tuple[int, ...] | None = None
    precision: str = "fp16"
    optimization_level: int = 3
    workspace_mib: int = 4096
    timing_cache: str = DEFAULT_TIMING_CACHE
    version_compatible: bool = False
    tf32: bool = True
    cuda_graph: bool = False
    path: str | None = None  # where it was read from (None: built-in defaults)
    sha256: str | None = None  # of that file

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"profile name {self.name!r} must be letters, digits, '.', '_' or '-' "
                              "(it names the engine folder)")
        if not isinstance(self.description, str):
            raise ConfigError(f"description must be a string, got {self.description!r}")
        for key in ("min_batch", "opt_batch", "max_batch"):
            _int(getattr(self, key), f"batch.{key.split('_')[0]}", 1)
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"batch sizes must satisfy min <= opt <= max, got min={self.min_batch}, "
                              f"opt={self.opt_batch}, max={self.max_batch}")
        for key in ("cfg", "version_compatible", "tf32", "cuda_graph"):
            _bool(getattr(self, key), key)
        _dims(self.sample, "shapes.sample", 3)
        _dims(self.encoder_hidden_states, "shapes.encoder_hidden_states", 2)
        _dims(self.text_embeds, "shapes.text_embeds", 1)
        _dims(self.time_ids, "shapes.time_ids", 1)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"build.precision = {self.precision!r} is not supported; choose one of: "
                              f"{', '.join(PRECISIONS)}")
        _int(self.optimization_level, "build.optimization_level", 0, 5)
        _int(self.workspace_mib, "build.workspace_mib", 1)
        if not isinstance(self.timing_cache, str):
            raise ConfigError(f"build.timing_cache must be a path string ('' for none), got {self.timing_cache!r}")

    @property
    def batches(self) -> tuple[int, int, int]:
        """Engine batch sizes (min, opt, max): doubled when CFG batches [uncond; cond] in one call."""
        k = 2 if self.cfg else 1
        return self.min_batch * k, self.opt_batch * k, self.max_batch * k

    @property
    def onnx_file(self) -> str:
        return ONNX_FOR_PRECISION[self.precision]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in _SHAPE_FIELDS:
            d[key] = list(d[key]) if d[key] is not None else None
        d["engine_batches"] = list(self.batches)
        return d


def profile_from_dict(data: dict, *, name: str = "default", path: str | None = None,
                      sha256: str | None = None) -> BuildProfile:
    """Validate the TOML structure (known sections and keys only) and build the profile."""
    if not isinstance(data, dict):
        raise ConfigError("a build profile must be a TOML table")
    kwargs: dict[str, Any] = {"name": name, "path": path, "sha256": sha256}
    for key, value in data.items():
        if key in _TOP:
            kwargs[key] = value
            continue
        if key not in _SCHEMA:
            raise ConfigError(f"unknown profile key '{key}'; allowed: {', '.join((*_TOP, *_SCHEMA))}")
        if not isinstance(value, dict):
            raise ConfigError(f"profile key '{key}' must be a table ([{key}])")
        for sub, v in value.items():
            if sub not in _SCHEMA[key]:
                raise ConfigError(f"unknown profile key '{key}.{sub}'; allowed in [{key}]: "
                                  f"{', '.join(_SCHEMA[key])}")
            kwargs[_SCHEMA[key][sub]] = tuple(v) if isinstance(v, list) else v
    return BuildProfile(**kwargs)


def load_profile(path: str | Path) -> BuildProfile:
    """Read and validate a build profile TOML file."""
    from saq_deploy.utils.io import sha256_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"build profile '{path}' does not exist (profiles live in engines/profiles/*.toml)")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"build profile '{path}' is not valid TOML: {e}") from e
    return profile_from_dict(data, name=path.stem, path=str(path), sha256=sha256_file(path))


def resolve_profile(profile: BuildProfile | str | Path | None) -> BuildProfile:
    """A profile object, a path to load, or None for the built-in defaults."""
    if isinstance(profile, BuildProfile):
        return profile
    return BuildProfile() if profile is None else load_profile(profile)


def _rest_dims(spec: dict, profile: BuildProfile, meta: dict) -> list[int]:
    """The non-batch dims of one input: the export's fixed dims, checked against the profile."""
    name, rest = spec["name"], list(spec["shape"][1:])
    want = getattr(profile, name) if name in _SHAPE_FIELDS else None
    if name == "sample":
        model = list(meta["sample_shape"])
        if rest != model:
            raise ConfigError(f"the ONNX input 'sample' has shape {rest} but the model samples {model}")
    if want is not None:
        if all(isinstance(d, int) for d in rest) and list(want) != rest:
            raise ConfigError(f"profile '{profile.name}' is for {name} {list(want)} but this model's is {rest}: "
                              "use a profile for this model (engines/profiles/)")
        rest = list(want)
    if not all(isinstance(d, int) for d in rest):
        raise ConfigError(f"input '{name}' has dynamic dims {rest}: set shapes.{name} in the build profile")
    return rest


def resolve_shapes(profile: BuildProfile, inputs: list[dict], meta: dict) -> dict[str, dict[str, list[int]]]:
    """Optimization-profile shapes ``{input: {"min", "opt", "max"}}`` from the profile's batch
    sizes (CFG-doubled) and the model's fixed dims. Every input's first dim is the batch."""
    bmin, bopt, bmax = profile.batches
    shapes = {}
    for spec in inputs:
        if not spec["shape"] or spec["shape"][0] != "B":
            raise ConfigError(f"input '{spec['name']}' has no dynamic batch dim: re-export with saq-deploy export")
        rest = _rest_dims(spec, profile, meta)
        shapes[spec["name"]] = {"min": [bmin, *rest], "opt": [bopt, *rest], "max": [bmax, *rest]}
    for key, what in _COND_SHAPES.items():
        if getattr(profile, key) is not None and key not in shapes:
            raise ConfigError(f"profile '{profile.name}' sets shapes.{key} but this model has no {what}")
    return shapes
