"""Root Typer app. Commands live one per module and import their heavy dependencies lazily.

``main()`` maps user errors (SaqError, bad options) to one line on stderr and a non-zero exit;
``--debug`` (or SAQ_DEPLOY_DEBUG=1) shows the traceback instead."""

from __future__ import annotations

import errno
import os
import re
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
    app.command("train-text-reference")(train.train_text_reference_cmd)
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


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Take ``--debug`` out of argv wherever it is (before a ``--``): Typer only knows it as a root
    option, so ``saq-deploy build-engine X --debug`` would otherwise be "no such option"."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:cut] if a != "--debug"]
    debug = len(head) < cut or os.environ.get("SAQ_DEPLOY_DEBUG", "") not in ("", "0")
    return head + argv[cut:], debug


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_WRITE = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.EROFS: "read-only file system"}


def _intended_path(filename: object) -> str:
    """Name the file the user asked for, not the hidden temp beside it (``.<name>.<random>.tmp``)."""
    if not filename:
        return "the output"
    name = os.fspath(filename) if isinstance(filename, (str, os.PathLike)) else str(filename)
    base = os.path.basename(name)
    m = re.fullmatch(r"\.(.+)\.[A-Za-z0-9_]+\.tmp", base) or re.fullmatch(r"\.(.+)\.partial", base)
    return os.path.join(os.path.dirname(name), m.group(1)) if m else name


def _os_error_line(exc: BaseException) -> str | None:
    """One line for the OSErrors a user fixes by freeing space or choosing another folder; they may
    sit under another library's exception (``raise ... from e``), so the cause chain is searched."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            path = _intended_path(e.filename)
            if e.errno in _NO_SPACE:
                what = "file too large for this file system or limit" if e.errno == errno.EFBIG else \
                    "no space left on device"
                return f"{what} while writing {path}: free space or choose another output folder"
            if e.errno in _NO_WRITE:
                return f"cannot write {path}: {_NO_WRITE[e.errno]}: choose another output folder"
            if e.errno == errno.EISDIR:
                return f"cannot write {path}: it is an existing folder: choose another output path"
            if e.errno == errno.ENOTDIR or (e.errno == errno.EEXIST and e.filename is not None
                                           and os.path.exists(e.filename) and not os.path.isdir(e.filename)):
                return f"cannot write {path}: a part of that path is a file, not a folder: " \
                    "choose another output folder"
        e = e.__cause__ or e.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    from saq_deploy.errors import BadOptionError, SaqError

    args, debug = _split_debug(sys.argv[1:] if argv is None else list(argv))
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
        if msg:  # empty for a bare `saq-deploy`: the help is already printed, nothing went wrong
            print(f"error: {msg}{hint}", file=sys.stderr)
        raise SystemExit(2) from None
    except SaqError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        # a bad option value is a usage error (exit 2, as Typer's own); other user errors exit 1
        raise SystemExit(2 if isinstance(e, BadOptionError) else 1) from None
    except Exception as e:
        if debug:
            raise
        line = _os_error_line(e)
        if line is None:
            first = str(e).splitlines()[0] if str(e) else ""
            line = f"unexpected {type(e).__name__}: {first} (rerun with --debug for the traceback)"
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
