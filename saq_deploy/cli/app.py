"""Root Typer app. Commands live one per module and import their heavy dependencies lazily.

``main()`` maps user errors (SaqError, bad options) to one line on stderr and a non-zero exit;
``--debug`` (or SAQ_DEPLOY_DEBUG=1) shows the traceback instead."""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(
    name="saq-deploy",
    help="Sampling-aware quantization for diffusion UNets, shipped as ONNX Runtime / TensorRT engines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """saq-deploy command line."""


def _register() -> None:
    from saq_deploy.cli import calibrate, engine, evaluate, info, inspect, lint, sample, train

    app.command("sample")(sample.sample_cmd)
    app.command("calibrate")(calibrate.calibrate_cmd)
    app.command("evaluate")(evaluate.evaluate_cmd)
    app.command("models")(info.models_cmd)
    app.command("env")(info.env_cmd)
    app.command("train-reference")(train.train_reference_cmd)
    app.command("train-classifier")(train.train_classifier_cmd)
    app.command("export")(engine.export_cmd)
    app.command("build-engine")(engine.build_engine_cmd)
    app.command("validate")(engine.validate_cmd)
    app.command("bench")(engine.bench_cmd)
    app.command("summary")(engine.summary_cmd)
    app.command("lint")(lint.lint_cmd)
    app.command("inspect")(inspect.inspect_cmd)
    app.command("serve")(__import__("saq_deploy.cli.serve", fromlist=["x"]).serve_cmd)
    app.command("export-triton")(__import__("saq_deploy.cli.serve", fromlist=["x"]).export_triton_cmd)


_register()


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("SAQ_DEPLOY_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> None:
    from saq_deploy.errors import SaqError

    args = sys.argv[1:] if argv is None else argv
    debug = _debug_requested(args)
    try:
        rc = app(args=args, prog_name="saq-deploy", standalone_mode=False)
    except typer.Exit as e:
        raise SystemExit(e.exit_code) from None
    except typer.Abort:
        print("aborted", file=sys.stderr)
        raise SystemExit(130) from None
    except typer.TyperException as e:  # bad options: Typer's (vendored click) usage errors
        ctx = getattr(e, "ctx", None)
        name = ctx.command.name if ctx is not None and ctx.command is not None else None
        hint = f" (see 'saq-deploy {name} --help')" if name and name != "saq-deploy" else ""
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        print(f"error: {msg}{hint}", file=sys.stderr)
        raise SystemExit(2) from None
    except SaqError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as e:
        if debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"error: unexpected {type(e).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
