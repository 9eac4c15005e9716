"""`saq-deploy train-reference` and `saq-deploy train-classifier`: re-create the committed models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from saq_deploy.cli.options import SeedOpt


def train_reference_cmd(
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps (batch 64).")] = 4000,
    seed: SeedOpt = 0,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output diffusers folder.")] = Path("runs/reference/digits_unet"),
) -> None:
    """Train the built-in class-conditional DDPM on scikit-learn's digits (~20 min on 2 cores)."""
    from saq_deploy.reference.train import TrainConfig, train_reference

    output.parent.mkdir(parents=True, exist_ok=True)
    log = train_reference(output, TrainConfig(steps=steps, seed=seed), progress=True)
    typer.echo(f"wrote {output}: final loss {log['final_loss_mean_last_200']:.4f}, {log['wall_time_s']:.0f} s")


def train_text_reference_cmd(
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps (batch 64).")] = 2500,
    seed: SeedOpt = 0,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output pipeline folder.")] = Path("runs/reference/digits_text"),
) -> None:
    """Train the built-in text-to-image pipeline (builtin:digits-text: SD-1.x-style UNet, CLIP text encoder
    and tokenizer) on scikit-learn's digits with prompts like 'a bold seven' (~40 min on 2 cores)."""
    from saq_deploy.models.text_encoder import require_transformers
    from saq_deploy.reference.text_train import TextTrainConfig, train_text_reference

    require_transformers()
    log = train_text_reference(output, TextTrainConfig(steps=steps, seed=seed), progress=True)
    typer.echo(f"wrote {output}: final loss {log['final_loss_mean_last_200']:.4f}, {log['wall_time_s']:.0f} s")


def train_classifier_cmd(
    seed: SeedOpt = 0,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("runs/reference"),
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Training epochs (default: 20, "
                                               "as for the committed weights).")] = None,
) -> None:
    """Train the digit classifier used for metrics and write FID reference statistics."""
    from saq_deploy.eval.train_classifier import train_and_save

    output.mkdir(parents=True, exist_ok=True)
    report = train_and_save(output, seed=seed, epochs=epochs, progress=True)
    typer.echo(f"wrote {output}: held-out accuracy {report.get('heldout_accuracy')}")
