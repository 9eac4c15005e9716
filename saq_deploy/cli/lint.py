"""`saq-deploy lint`: check a Q/DQ ONNX graph against TensorRT or ONNX Runtime CPU rules."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class LintTarget(str, Enum):
    tensorrt = "tensorrt"
    onnxruntime_cpu = "onnxruntime-cpu"


ModelArg = Annotated[Path, typer.Argument(help="ONNX model file (external data beside it is loaded too).")]
TargetOpt = Annotated[LintTarget, typer.Option("--target", "-t", case_sensitive=False,
                                               help="Runtime whose Q/DQ rules apply.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the issues as a JSON list instead of text.")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Exit 1 on warnings too, not only on errors.")]


def lint_cmd(
    model: ModelArg,
    target: TargetOpt = LintTarget.tensorrt,
    json_out: JsonOpt = False,
    strict: StrictOpt = False,
) -> None:
    """Lint a Q/DQ ONNX model; exit 1 on any error (or any warning with --strict)."""
    import json
    from dataclasses import asdict

    from saq_deploy.export.lint import format_issues, lint_model, summary

    issues = lint_model(model, target.value)
    counts = summary(issues)
    if json_out:
        typer.echo(json.dumps([asdict(i) for i in issues], indent=2))
    else:
        if issues:
            typer.echo(format_issues(issues))
            typer.echo(f"{counts['errors']} errors, {counts['warnings']} warnings (target {target.value})")
        else:
            typer.echo(f"clean: no issues (target {target.value})")
    if counts["errors"] or (strict and counts["warnings"]):
        raise typer.Exit(1)
