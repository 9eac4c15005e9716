"""`saq-deploy sample`: a grid of samples from a model through one of our samplers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from saq_deploy.cli.engine import ForceOpt
from saq_deploy.cli.options import (
    ArtifactOpt,
    CfgOpt,
    EngineOpt,
    ModelOpt,
    NumOpt,
    OutputOpt,
    SamplerName,
    SamplerOpt,
    SeedOpt,
    SpacingOpt,
    StepsOpt,
)


def sample_cmd(
    model: ModelOpt = "builtin:digits",
    sampler: SamplerOpt = SamplerName.dpmpp_2m,
    steps: StepsOpt = 10,
    cfg: CfgOpt = 1.5,
    seed: SeedOpt = 0,
    num_samples: NumOpt = 64,
    label: Annotated[int | None, typer.Option("--label", help="Class label for every sample (default: cycle through classes).")] = None,
    spacing: SpacingOpt = None,
    artifact: ArtifactOpt = None,
    engine: EngineOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per model call batch.")] = 64,
    cond_file: Annotated[Path | None, typer.Option("--cond-file", help="Cross-attention UNets: safetensors with 'cond' (1|N, L, D) and optional 'uncond' embeddings.")] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="Text-to-image UNets: a prompt (repeat for several; sample i gets prompt i mod P, one grid column each).")] = None,
    prompts_file: Annotated[Path | None, typer.Option("--prompts-file", help="Text-to-image UNets: prompts, one per line (after any --prompt).")] = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt", help="Text-to-image UNets: what guidance steers away from (default, as diffusers: the empty prompt; zeros for an SDXL pipeline with force_zeros_for_empty_prompt).")] = None,
    output: OutputOpt = Path("grid.png"),
    force: ForceOpt = False,
) -> None:
    """Sample a grid PNG (and a JSON manifest beside it)."""
    from saq_deploy.api import sample_to_file
    from saq_deploy.generate import SampleSettings
    from saq_deploy.prompt_inputs import read_prompts_file

    prompts = list(prompt or []) + (read_prompts_file(prompts_file) if prompts_file is not None else [])
    settings = SampleSettings(sampler=sampler.value, steps=steps, cfg=cfg, seed=seed, n=num_samples,
                              label=label, spacing=spacing.value if spacing else None, batch_size=batch_size)
    out = sample_to_file(model, settings, output, cond_file=cond_file, artifact=artifact, engine=engine,
                         prompts=prompts or None, negative_prompt=negative_prompt, progress=True, force=force)
    import json

    m = json.loads(out.with_suffix(".json").read_text())
    typer.echo(f"wrote {out} ({describe_run(m, num_samples)})")
    if m.get("grid_note"):
        typer.echo(f"note: {m['grid_note']}")


def describe_run(manifest: dict, n: int) -> str:
    """What actually ran, from the sample manifest: guidance only where it was applied."""
    ran = manifest["ran"]
    parts = [f"{n} samples", ran["sampler"], f"{ran['steps']} steps"]
    if ran["guidance_scale"] is not None:
        parts.append(f"cfg {ran['guidance_scale']:g}")
    elif ran["conditional"]:
        parts.append("conditional, no guidance (cfg 1)")
    else:
        parts.append("unconditional, no guidance")
    if manifest.get("prompts"):
        p = manifest["prompts"]
        parts.append(f"{len(p)} prompt{'s' if len(p) > 1 else ''} ({'; '.join(p[:3])}{'; ...' if len(p) > 3 else ''})")
    elif manifest.get("conditioning") == "artifact":
        parts.append("the artifact's calibration prompts")
    if manifest.get("decoded_by_vae"):
        parts.append(f"decoded by the VAE in {manifest['decoded_by_vae']}")
    return ", ".join(parts)
