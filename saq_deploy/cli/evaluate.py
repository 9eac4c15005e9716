"""`saq-deploy evaluate`: digit-FID, IS, precision/recall and accuracy of a model's samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from saq_deploy.cli.options import (
    ArtifactOpt,
    CfgOpt,
    ModelOpt,
    SamplerName,
    SamplerOpt,
    SeedOpt,
    SpacingOpt,
    StepsOpt,
)


def evaluate_cmd(
    model: ModelOpt = "builtin:digits",
    sampler: SamplerOpt = SamplerName.dpmpp_2m,
    steps: StepsOpt = 10,
    cfg: CfgOpt = 1.5,
    seed: SeedOpt = 0,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="Samples (labels cycle 0..9).")] = 1000,
    spacing: SpacingOpt = None,
    artifact: ArtifactOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per model call batch.")] = 250,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also write the result as JSON.")] = None,
) -> None:
    """Sample and score against the real digits (digit-classifier feature space)."""
    from saq_deploy.api import evaluate_model
    from saq_deploy.generate import SampleSettings
    from saq_deploy.utils.io import write_json_atomic

    settings = SampleSettings(sampler=sampler.value, steps=steps, cfg=cfg, seed=seed, n=num_samples,
                              spacing=spacing.value if spacing else None, batch_size=batch_size)
    from saq_deploy.utils.distributed import env_world

    rank0 = env_world().is_rank0  # under torchrun every rank samples, rank 0 alone reports and writes
    result = evaluate_model(model, settings, artifact=artifact, progress=rank0)
    if not rank0:
        return
    if output is not None:
        write_json_atomic(output, result)
    m = result["metrics"]
    typer.echo(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}))
