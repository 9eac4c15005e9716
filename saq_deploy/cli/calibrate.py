"""`saq-deploy calibrate`: run a calibration recipe (with overrides) into an artifact folder."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Bits(str, Enum):
    w8a8 = "w8a8"
    w4a8 = "w4a8"
    w4a4 = "w4a4"


class Method(str, Enum):
    minmax = "minmax"
    percentile = "percentile"
    mse = "mse"
    brecq = "brecq"
    sa_ptq = "sa-ptq"
    modelopt_int8 = "modelopt-int8"
    sa_qlora = "sa-qlora"
    qlora_mse = "qlora-mse"


class DataSampler(str, Enum):
    dpm_solver_2 = "dpm-solver-2"
    plms = "plms"
    ddim = "ddim"


def calibrate_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Artifact folder to create.")],
    recipe: Annotated[Path | None, typer.Option("--recipe", "-c", help="Recipe TOML (calibration/*.toml). Without it the built-in defaults run (builtin:digits, w8a8, sa-ptq; named on stderr first).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Override \\[model].spec.")] = None,
    bits: Annotated[Bits | None, typer.Option("--bits", help="Override \\[quant].bits.")] = None,
    method: Annotated[Method | None, typer.Option("--method", help="Override \\[calibration].method.")] = None,
    sampler: Annotated[DataSampler | None, typer.Option("--sampler", help="Sampler whose trajectories are the calibration data.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Override \\[calibration].steps.")] = None,
    iters: Annotated[int | None, typer.Option("--iters", help="Override \\[reconstruction].iters (per block).")] = None,
    num_samples: Annotated[int | None, typer.Option("--num-samples", "-n", help="Override \\[calibration].num_samples (seeds).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Override \\[calibration].seed.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Override \\[qlora].epochs (sa-qlora, qlora-mse).")] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="Override \\[qlora].rank (LoRA rank).")] = None,
) -> None:
    """Calibrate a UNet (SA-PTQ / SA-QLoRA with the MOTA target, or a baseline). Re-run after a kill to resume."""
    from saq_deploy.calibrate.recipe import load_recipe
    from saq_deploy.calibrate.run import calibrate

    r = load_recipe(recipe).with_overrides({
        "model.spec": model, "quant.bits": bits.value if bits else None,
        "calibration.method": method.value if method else None,
        "calibration.sampler": sampler.value if sampler else None, "calibration.steps": steps,
        "calibration.num_samples": num_samples, "calibration.seed": seed, "reconstruction.iters": iters,
        "qlora.epochs": epochs, "qlora.rank": rank,
    })
    if recipe is None:
        # defaults run for minutes: name them so a forgotten --recipe is seen before, not after
        c = r.calibration
        typer.echo(f"no --recipe: running the built-in defaults with your overrides (model {r.model.spec}, "
                   f"{r.quant.bits}, {c.method}, {c.sampler} {c.steps} steps, {c.num_samples} samples)", err=True)
    out = calibrate(r, output, progress=True)
    typer.echo(f"wrote {out} ({r.calibration.method}, {r.quant.bits})")
