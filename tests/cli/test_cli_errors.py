"""Bad input: one clear line on stderr, non-zero exit, no traceback, no partial artifact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from saq_deploy.cli.app import main
from saq_deploy.reference import DIGITS_UNET_DIR


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    return exc.value.code, err


@pytest.mark.parametrize(
    "args, fragment, code",
    [
        (["sample", "--sampler", "euler"], "'euler' is not one of", 2),
        (["sample", "--model", "builtin:cifar"], "unknown built-in model 'builtin:cifar'", 1),
        (["sample", "--steps", "0"], "--steps must be >= 1", 2),
        (["sample", "--model", "/nonexistent/model"], "does not exist", 1),
        (["sample", "--label", "12", "-n", "2", "--steps", "1"], "outside 0..9", 2),
        (["sample", "--label", "-1", "-n", "2", "--steps", "1"], "outside 0..9", 2),
        (["sample", "-n", "0"], "-n must be >= 1", 2),
    ],
)
def test_bad_input_one_line(args, fragment, code, capsys, tmp_path):
    out = tmp_path / "grid.png"
    rc, err = run_cli([*args, "-o", str(out)], capsys)
    assert rc == code
    assert fragment in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_corrupt_safetensors(capsys, tmp_path):
    bad = tmp_path / "model"
    shutil.copytree(DIGITS_UNET_DIR, bad)
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 100)
    out = tmp_path / "grid.png"
    rc, err = run_cli(["sample", "--model", str(bad), "-n", "2", "--steps", "1", "-o", str(out)], capsys)
    assert rc == 1 and "not a valid safetensors file" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_folder_without_config(capsys, tmp_path):
    rc, err = run_cli(["sample", "--model", str(tmp_path), "-o", str(tmp_path / "g.png")], capsys)
    assert rc == 1 and "not a diffusers model folder" in err


def test_debug_shows_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "saq_deploy.cli.app", "--debug", "sample", "--model", "builtin:nope",
         "-o", str(tmp_path / "g.png")], capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_sample_writes_grid_and_manifest(capsys, tmp_path):
    out = tmp_path / "grid.png"
    rc, _ = run_cli(["sample", "--sampler", "ddim", "--steps", "3", "-n", "4", "--label", "3",
                     "--seed", "1", "-o", str(out)], capsys)
    assert rc == 0 and out.exists()
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["settings"]["sampler"] == "ddim" and manifest["labels"] == [3, 3, 3, 3]
    assert len(manifest["model_hash"]) == 64 and manifest["versions"]["torch"]
    from PIL import Image

    assert Image.open(out).size[0] > 16
