"""CLI usage and user-error mapping (issue 15 items 6, 9): bare invocation, --debug anywhere, exit 2
for bad option values, recipe value types, OS errors a user can fix, and the notes printed before
long work starts."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from saq_deploy.cli.app import main
from saq_deploy.errors import ConfigError


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def test_bare_invocation_prints_help_without_an_empty_error_line(capsys):
    rc, out, err = run_cli([], capsys)
    assert rc == 2
    assert "Usage: saq-deploy" in out and "build-engine" in out
    assert "error:" not in err, err


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="unknown built-in model"):  # re-raised, not "no such option"
        main(["sample", "--model", "builtin:nope", "-o", str(tmp_path / "g.png"), "--debug"])
    assert not list(tmp_path.iterdir())


def test_debug_after_a_double_dash_is_not_taken(capsys, tmp_path):
    # after "--" everything is an argument: --debug there stays the user's, so sample sees an extra arg
    rc, _, err = run_cli(["sample", "-o", str(tmp_path / "g.png"), "--", "--debug"], capsys)
    assert rc == 2 and "--debug" in err


@pytest.mark.parametrize("args, fragment", [
    (["export", "ART", "--calib-samples", "0"], "--calib-samples must be >= 1"),
    (["validate", "ART", "--steps", "0"], "--steps"),
    (["bench", "ART", "--calls", "0"], "--calls"),
    (["build-engine", "ART", "--max-batch", "0"], "--max-batch"),
    (["sample", "--cfg", "-1", "-n", "1", "--steps", "1"], "--cfg must be >= 0"),
    (["sample", "--batch-size", "0", "-n", "1", "--steps", "1"], "--batch-size must be >= 1"),
])
def test_bad_option_values_exit_2(args, fragment, capsys, tmp_path):
    args = [str(tmp_path / "art") if a == "ART" else a for a in args]
    if args[0] == "sample":
        args += ["-o", str(tmp_path / "g.png")]
    rc, _, err = run_cli(args, capsys)
    assert rc == 2, err
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("toml, fragment", [
    ('[reconstruction]\nwarmup = "abc"\n', "reconstruction.warmup must be a number, got 'abc' (str)"),
    ('[calibration]\nseed = "0"\n', "calibration.seed must be an integer, got '0' (str)"),
    ("[calibration]\nsteps = 2.5\n", "calibration.steps must be an integer, got 2.5 (float)"),
    ('[quant]\nattention_matmul = "yes"\n', "quant.attention_matmul must be true or false"),
    ("[model]\nspec = 3\n", "model.spec must be a string"),
])
def test_recipe_values_of_the_wrong_type(toml, fragment, capsys, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(toml)
    out = tmp_path / "art"
    rc, _, err = run_cli(["calibrate", "-c", str(recipe), "-o", str(out)], capsys)
    assert rc == 1
    assert fragment in err and "unexpected" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]


def test_permission_denied_output_names_the_path(capsys, tmp_path):
    # sysfs refuses to create files even for root, so this is a real EACCES (chmod would not stop root)
    rc, _, err = run_cli(["sample", "-n", "1", "--steps", "1", "-o", "/sys/saq-grid.png"], capsys)
    assert rc == 1
    assert "cannot write /sys/saq-grid.png: permission denied: choose another output folder" in err, err
    assert "unexpected" not in err and len(err.strip().splitlines()) == 1


def test_output_under_a_regular_file(capsys, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rc, _, err = run_cli(["sample", "-n", "1", "--steps", "1", "-o", str(blocker / "g.png")], capsys)
    assert rc == 1
    assert f"cannot write {blocker}" in err and "not a folder" in err and "unexpected" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.slow
def test_file_size_limit_reported_as_out_of_space(tmp_path):
    """A real EFBIG from the kernel: RLIMIT_FSIZE below the grid's size, SIGXFSZ ignored so the write
    fails instead of killing the process (the same path as ENOSPC/EDQUOT in main())."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from saq_deploy.cli.app import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
        main(["sample", "-n", "4", "--steps", "1", "-o", {str(tmp_path / "g.png")!r}])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"while writing {tmp_path / 'g.png'}: free space or choose another output folder" in proc.stderr
    assert "unexpected" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "g.png").exists() and not list(tmp_path.glob(".*.tmp"))


def test_calibrate_without_recipe_names_the_defaults(capsys, tmp_path):
    # a missing model fails fast, after the note: the note must come before any work starts
    rc, _, err = run_cli(["calibrate", "-o", str(tmp_path / "art"), "-m", str(tmp_path / "none"),
                          "--bits", "w4a8"], capsys)
    assert rc == 1
    note, *rest = err.strip().splitlines()
    assert note.startswith("no --recipe: running the built-in defaults")
    assert f"model {tmp_path / 'none'}" in note and "w4a8" in note and "sa-ptq" in note
    assert rest and "does not exist" in rest[-1]


def test_calibrate_with_recipe_prints_no_defaults_note(capsys, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nspec = "{tmp_path / "none"}"\n')
    rc, _, err = run_cli(["calibrate", "-c", str(recipe), "-o", str(tmp_path / "art")], capsys)
    assert rc == 1 and "built-in defaults" not in err


def test_calibrate_help_documents_the_defaults(capsys):
    rc, out, _ = run_cli(["calibrate", "--help"], capsys)
    text = re.sub(r"[\s\u2502]+", " ", out)  # undo rich's wrapping inside the option box
    assert rc == 0 and "Without it the built-in defaults run (builtin:digits, w8a8, sa-ptq" in text, text
