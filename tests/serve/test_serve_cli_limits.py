"""`saq-deploy serve` options for slow clients and TensorRT plans: checked before anything loads,
passed through to the engine loader, and the open-files limit raised at start."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from saq_deploy.cli.app import main

pytest.importorskip("fastapi", reason="the serve command needs the 'serve' extra (pip install -e '.[serve]')")


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["--header-timeout", "0"], "--header-timeout must be in (0, 3600] seconds, got 0.0"),
    (["--body-timeout", "-1"], "--body-timeout must be in (0, 3600] seconds, got -1.0"),
    (["--body-timeout", "7200"], "--body-timeout must be in (0, 3600] seconds, got 7200.0"),
    (["--max-in-flight", "0"], "--max-in-flight must be >= 1, got 0"),
    (["--force"], "--force applies to TensorRT plans only (--backend tensorrt)"),
])
def test_bad_serve_options_one_line(args, fragment, capsys, tmp_path):
    rc, err = run_cli(["serve", str(tmp_path), *args], capsys)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], err


def test_force_reaches_the_engine_loader(gated_artifact, monkeypatch, capsys):
    """--force travels CLI -> run_server -> load_served -> load_engine(force=True); the stand-in
    loader stops there (TensorRT is not installed here), after the real artifact check."""
    from saq_deploy import backends
    from saq_deploy.errors import ModelLoadError

    seen = {}

    def loader(path, **kw):
        seen.update(kw, path=path)
        raise ModelLoadError("stand-in loader: stop here")

    monkeypatch.setattr(backends, "load_engine", loader)
    rc, err = run_cli(["serve", str(gated_artifact), "--backend", "tensorrt", "--engine",
                       str(gated_artifact / "engine"), "--force"], capsys)
    assert rc != 0 and "stand-in loader" in err
    assert seen["force"] is True and seen["path"] == gated_artifact / "engine"
    seen.clear()
    run_cli(["serve", str(gated_artifact), "--backend", "tensorrt", "--engine", str(gated_artifact / "engine")],
            capsys)
    assert seen["force"] is False


def _limits_after_start(soft: int, hard: int) -> tuple[str, tuple[int, int]]:
    code = ("import resource; from saq_deploy.serve.server import open_files_line; print(open_files_line()); "
            "print(*resource.getrlimit(resource.RLIMIT_NOFILE))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    line, limits = p.stdout.strip().splitlines()
    return line, tuple(map(int, limits.split()))


def test_open_files_limit_is_raised_to_the_hard_limit():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 8192:
        pytest.skip(f"the hard open-files limit here is {hard}: nothing to raise to")
    hard = 8192 if hard == resource.RLIM_INFINITY else hard
    line, (soft_now, hard_now) = _limits_after_start(256, hard)
    assert soft_now == hard_now == hard
    assert line == f"open-files limit {hard} (raised from 256), hard {hard}"
    # a hard limit this low is worth a warning: about that many idle sockets stop accept()
    line, (soft_now, _) = _limits_after_start(1024, 1024)
    assert soft_now == 1024 and line.startswith("WARNING: open-files limit 1024, hard 1024")
