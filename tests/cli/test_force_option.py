"""``--force`` on sample / validate / bench (issue 15 item 8): the TensorRT load error tells users to
pass it, so the commands accept it and hand it to ``load_engine(force=...)``. It only means something
for version-compatible TensorRT plans, so anywhere else it is refused with one line (not silently
ignored: the user expects it to change something)."""

from __future__ import annotations

import pytest

from saq_deploy.backends import build_engine
from saq_deploy.calibrate.run import calibrate
from saq_deploy.cli.app import main
from tests.integration.test_calibrate import tiny

HELP = "Only for version-compatible TensorRT plans built by another TensorRT version"


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


@pytest.mark.parametrize("cmd", ["sample", "validate", "bench"])
def test_force_is_an_option_with_its_help(cmd, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one help line per option
    rc, out, _ = run_cli([cmd, "--help"], capsys)
    assert rc == 0
    assert any("--force" in line and HELP in line for line in out.splitlines()), out


def test_sample_force_without_an_engine(capsys, tmp_path):
    rc, _, err = run_cli(["sample", "--force", "-n", "1", "--steps", "1", "-o", str(tmp_path / "g.png")], capsys)
    assert rc == 1
    assert err.strip() == "error: --force applies to TensorRT engines only: pass it together with --engine DIR"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cmd", ["validate", "bench"])
def test_force_with_the_onnxruntime_backend_is_refused_before_any_work(cmd, capsys, tmp_path):
    # the artifact does not even exist: the refusal comes first, from the options alone
    rc, _, err = run_cli([cmd, str(tmp_path / "art"), "--force"], capsys)
    assert rc == 1
    assert err.strip() == "error: --force applies to TensorRT plans only (--backend tensorrt), not onnxruntime"


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    out = tmp_path_factory.mktemp("force") / "w8a8"
    calibrate(tiny(method="minmax", bits="w8a8"), out)
    build_engine(out, "onnxruntime")
    return out


@pytest.mark.slow
def test_force_reaches_load_engine_from_every_command(art, capsys, tmp_path):
    engine = art / "engine"
    refusal = (f"error: --force applies to TensorRT plans only (version-compatible ones built by another "
               f"TensorRT version); the engine '{engine}' runs on onnxruntime: drop --force")
    out = tmp_path / "g.png"
    rc, _, err = run_cli(["sample", "--engine", str(engine), "-n", "2", "--steps", "1", "--force", "-o", str(out)],
                         capsys)
    assert (rc, err.strip()) == (1, refusal)
    assert not out.exists()
    # validate / bench pass it through too: --backend tensorrt lets it past the option check, and the
    # engine's own manifest (an ONNX Runtime one) refuses it inside load_engine
    for cmd in (["validate", "-n", "1", "--steps", "1", "--quality-n", "0", "-o", str(tmp_path / "rep")],
                ["bench", "--calls", "1", "--batch", "1"]):
        rc, _, err = run_cli([cmd[0], str(art), "--backend", "tensorrt", "--engine", str(engine), "--force",
                              *cmd[1:]], capsys)
        assert (rc, err.strip()) == (1, refusal), cmd
    assert not (tmp_path / "rep").exists() and not (engine / "parity.json").exists()
    # the control: the same engine without --force samples
    rc, _, err = run_cli(["sample", "--engine", str(engine), "-n", "2", "--steps", "1", "-o", str(out)], capsys)
    assert rc == 0 and out.exists(), err
