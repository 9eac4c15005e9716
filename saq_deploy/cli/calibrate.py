"""`saq-deploy calibrate`: run a calibration recipe (with overrides) into an artifact folder."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from saq_deploy.calibrate.methods import AUTO, CRITERIA, METHOD_NAMES
from saq_deploy.calibrate.recipe import BITS, DATA_SAMPLERS

# the choices come from where the names live (the method registry, the recipe's tuples)
Bits = Enum("Bits", {n: n for n in BITS}, type=str)
Method = Enum("Method", {n: n for n in (*METHOD_NAMES, AUTO)}, type=str)
Criterion = Enum("Criterion", {n: n for n in CRITERIA}, type=str)
FP_CRITERION = Criterion("fp")
DataSampler = Enum("DataSampler", {n: n for n in DATA_SAMPLERS}, type=str)


def calibrate_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Artifact folder to create.")],
    recipe: Annotated[Path | None, typer.Option("--recipe", "-c", help="Recipe TOML (calibration/*.toml). Without it the built-in defaults run (builtin:digits, w8a8, sa-ptq; named on stderr first).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Override \\[model].spec.")] = None,
    bits: Annotated[Bits | None, typer.Option("--bits", help="Override \\[quant].bits.")] = None,
    method: Annotated[Method | None, typer.Option("--method", help="Override \\[calibration].method; 'auto' calibrates the candidate methods for these bits on your model and keeps the best (see --compare).")] = None,
    sampler: Annotated[DataSampler | None, typer.Option("--sampler", help="Sampler whose trajectories are the calibration data.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Override \\[calibration].steps.")] = None,
    iters: Annotated[int | None, typer.Option("--iters", help="Override \\[reconstruction].iters (per block).")] = None,
    num_samples: Annotated[int | None, typer.Option("--num-samples", "-n", help="Override \\[calibration].num_samples (seeds).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Override \\[calibration].seed.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Override \\[qlora].epochs (sa-qlora, qlora-mse).")] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="Override \\[qlora].rank (LoRA rank).")] = None,
    compare: Annotated[str | None, typer.Option("--compare", help="Comma-separated methods to calibrate and rank (keeps the best); --method auto picks them for you.")] = None,
    criterion: Annotated[Criterion, typer.Option("--criterion", help="Ranking of --compare / auto: distance of the final samples to FP's at the same sampler (fp), or to FP DPM-Solver-2's (fp-higher-order).")] = FP_CRITERION,
    eval_n: Annotated[int, typer.Option("--eval-n", help="Samples per candidate for the ranking (--compare / auto).")] = 64,
    budget: Annotated[float | None, typer.Option("--budget", help="Minutes after which --compare / auto starts no further candidate.")] = None,
    keep_candidates: Annotated[bool, typer.Option("--keep-candidates", help="Keep the losing artifacts in <output>-candidates/.")] = False,
) -> None:
    """Calibrate a UNet (SA-PTQ / SA-QLoRA with the MOTA target, or a baseline). Re-run after a kill to resume."""
    from saq_deploy.calibrate.recipe import load_recipe
    from saq_deploy.calibrate.run import calibrate
    from saq_deploy.errors import BadOptionError

    comparing = compare is not None or (method is not None and method.value == AUTO)
    if compare is not None and method is not None:
        raise BadOptionError("--compare names the methods itself: drop --method")
    r = load_recipe(recipe).with_overrides({
        "model.spec": model, "quant.bits": bits.value if bits else None,
        "calibration.method": method.value if method and not comparing else None,
        "calibration.sampler": sampler.value if sampler else None, "calibration.steps": steps,
        "calibration.num_samples": num_samples, "calibration.seed": seed, "reconstruction.iters": iters,
        "qlora.epochs": epochs, "qlora.rank": rank,
    })
    from saq_deploy.utils.distributed import env_world

    rank0 = env_world().is_rank0  # under torchrun rank 0 alone talks; every rank computes
    if recipe is None and rank0:
        # defaults run for minutes: name them so a forgotten --recipe is seen before, not after
        c = r.calibration
        typer.echo(f"no --recipe: running the built-in defaults with your overrides (model {r.model.spec}, "
                   f"{r.quant.bits}, {c.method}, {c.sampler} {c.steps} steps, {c.num_samples} samples)", err=True)
    if comparing and env_world().active:
        raise BadOptionError("--compare and --method auto run in one process: start them without torchrun")
    if comparing:
        _compare(r, output, compare, criterion.value, eval_n, budget, keep_candidates)
        return
    out = calibrate(r, output, progress=rank0)
    if rank0:
        typer.echo(f"wrote {out} ({r.calibration.method}, {r.quant.bits})")


def _compare(r, output: Path, compare: str | None, criterion: str, eval_n: int, budget: float | None,
             keep: bool) -> None:
    from saq_deploy.calibrate.compare import COMPARISON_DIR, CompareSettings, compare_methods
    from saq_deploy.calibrate.compare_report import REPORT_FILE, lead_line
    from saq_deploy.calibrate.methods import get_method
    from saq_deploy.errors import BadOptionError, ConfigError

    methods = tuple(m.strip() for m in compare.split(",") if m.strip()) if compare else ()
    try:
        for m in methods:
            get_method(m)
        settings = CompareSettings(methods=methods, criterion=criterion, eval_n=eval_n,
                                   budget_s=None if budget is None else budget * 60, keep_candidates=keep)
        settings = settings.resolved(r)
    except BadOptionError:
        raise
    except ConfigError as e:  # every value here came from an option: exit 2
        raise BadOptionError(str(e).replace("calibration.method", "--compare")) from None
    typer.echo(f"comparing {', '.join(settings.methods)} ({r.quant.bits}, ranked by '{criterion}' on "
               f"{eval_n} samples)", err=True)
    result = compare_methods(r, output, settings, progress=True, note=lambda line: typer.echo(line, err=True))
    typer.echo(f"kept {lead_line(result)}")
    typer.echo(f"wrote {output} ({result['winner']}, {r.quant.bits}); report {output / COMPARISON_DIR / REPORT_FILE}")
