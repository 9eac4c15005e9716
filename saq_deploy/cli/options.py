"""Options shared by several commands: same name, type and help everywhere."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class SamplerName(str, Enum):
    ddim = "ddim"
    plms = "plms"
    dpm_solver_2 = "dpm-solver-2"
    dpmpp_2m = "dpmpp-2m"
    unipc = "unipc"


class Spacing(str, Enum):
    leading = "leading"
    trailing = "trailing"
    linspace = "linspace"
    quadratic = "quadratic"
    logsnr = "logsnr"


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="builtin:digits, or a local diffusers UNet / pipeline folder.")]
SamplerOpt = Annotated[SamplerName, typer.Option("--sampler", help="Sampler.", case_sensitive=False)]
StepsOpt = Annotated[int, typer.Option("--steps", help="Sampling steps (DPM-Solver-2: outer steps, 2 evaluations each).")]
CfgOpt = Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale (1 = no guidance).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the initial noise.")]
NumOpt = Annotated[int, typer.Option("--num-samples", "-n", help="Number of samples.")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Output file.")]
SpacingOpt = Annotated[Spacing | None, typer.Option("--spacing", help="Timestep spacing (default: the sampler's diffusers default).", case_sensitive=False)]
ArtifactOpt = Annotated[Path | None, typer.Option("--artifact", "-a", help="Calibrated artifact folder: sample its fake-quant model (overrides --model).")]
EngineOpt = Annotated[Path | None, typer.Option("--engine", "-e", help="Engine folder from build-engine: sample through the engine (overrides --model/--artifact).")]
