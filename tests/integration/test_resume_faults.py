"""kill -9 of `saq-deploy calibrate` at deterministic points, then the same command again: the
re-run must succeed, end byte-identical to an uninterrupted run, and leave nothing behind
(benchmarks/faults.py does the same at random moments)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import digits_recipe

ROOT = Path(__file__).resolve().parents[2]
# float reductions depend on the thread count: byte-identity is only defined at a fixed one
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RECIPE = digits_recipe("w8a8", "minmax", num_samples=4, steps=3)
QLORA_RECIPE = digits_recipe("w4a8", "sa-qlora", num_samples=4, steps=3,
                             qlora={"rank": 4, "epochs": 3, "mixstep": [3], "batch_size": 2})
# Runs the CLI and SIGKILLs itself at a point too short-lived to hit by timing. cleanup: the moment
# calibrate starts removing its .partial folder, i.e. right after the artifact was renamed into
# place. qlora-json: after the epoch-2 checkpoint tensors were written, before their ckpt.json.
FAULT_CHILD = """
import os, shutil, signal, sys
from pathlib import Path
import saq_deploy.utils.io as io
fault = sys.argv.pop(1)
rmtree, write_json = shutil.rmtree, io.write_json_atomic
def rmtree_then_die(path, *a, **k):
    if fault == "cleanup" and str(path).endswith(".partial"):
        os.kill(os.getpid(), signal.SIGKILL)
    return rmtree(path, *a, **k)
def die_before_json(path, data):
    if fault == "qlora-json" and Path(path).name == "ckpt.json" and data.get("epochs_done") == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return write_json(path, data)
shutil.rmtree, io.write_json_atomic = rmtree_then_die, die_before_json
from saq_deploy.cli.app import main
main(sys.argv[1:])
"""


def _killed_at(fault: str, args: list[str]) -> None:
    res = subprocess.run([sys.executable, "-c", FAULT_CHILD, fault, *args], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr


pytestmark = pytest.mark.slow


def _args(recipe: Path, out: Path) -> list[str]:
    return ["calibrate", "-c", str(recipe), "-o", str(out)]


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saq_deploy.cli.app", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600, check=False)


def _tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (hidden ones included) -> sha256 ('' for folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
    return out


def _reference(recipe: Path, root: Path) -> dict[str, str]:
    """The files of one uninterrupted run, keyed by path relative to its parent folder."""
    res = _cli(_args(recipe, root / "out"))
    assert res.returncode == 0, res.stderr
    return _tree(root)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "minmax.toml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> dict[str, str]:
    return _reference(recipe, tmp_path_factory.mktemp("ref"))


def _assert_like_reference(root: Path, reference: dict[str, str]) -> None:
    tree = _tree(root)
    assert sorted(tree) == sorted(reference), "left behind or missing: " + str(set(tree) ^ set(reference))
    # the state file is the byte-reproducible one; manifest.json and report.md carry the wall time
    for name in ("out/calibrated.safetensors", "out/recipe.json"):
        assert tree[name] == reference[name], name


def test_kill_during_data_collection_is_cleaned_and_said(recipe, reference, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "saq_deploy.cli.app", *_args(recipe, out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = tmp_path / ".out.partial"
    deadline = time.monotonic() + 300
    while not any(work.glob(".data.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # the temp shard folder exists only while trajectories are collected
    assert proc.poll() is None, "calibrate finished before data collection could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stale = list(work.glob(".data.*.tmp"))
    assert stale and not out.exists()
    res = _cli(_args(recipe, out))
    assert res.returncode == 0, res.stderr
    assert f"removed stale temp folder {stale[0]}" in res.stderr
    _assert_like_reference(tmp_path, reference)


def test_kill_after_artifact_rename_rerun_finishes_cleanup(recipe, reference, tmp_path):
    out = tmp_path / "out"
    _killed_at("cleanup", _args(recipe, out))
    assert (out / "calibrated.safetensors").exists() and (tmp_path / ".out.partial").is_dir()
    res = _cli(_args(recipe, out))
    assert res.returncode == 0, res.stderr
    assert "left by a run killed after it wrote" in res.stderr
    _assert_like_reference(tmp_path, reference)


def test_existing_artifact_with_other_recipe_still_refused(recipe, tmp_path):
    """The cleanup above must not turn 'output already exists' into a silent success for a
    different recipe: the .partial folder is kept and the run refused."""
    out = tmp_path / "out"
    _killed_at("cleanup", _args(recipe, out))
    other = tmp_path / "other.toml"
    other.write_text(digits_recipe("w8a8", "minmax", num_samples=5, steps=3))
    res = _cli(_args(other, out))
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "already exists" in errors[0]
    assert (tmp_path / ".out.partial").is_dir()
    shutil.rmtree(tmp_path / ".out.partial")


def test_qlora_kill_between_checkpoint_files_resumes_not_restarts(tmp_path):
    """The epoch checkpoint is two files (tensors, then ckpt.json); a kill between them used to throw
    away every finished epoch. The re-run must resume from the tensors and still match a clean run."""
    import torch

    recipe = tmp_path / "qlora.toml"
    recipe.write_text(QLORA_RECIPE)
    reference = _reference(recipe, tmp_path / "ref")
    root = tmp_path / "killed"
    root.mkdir()
    _killed_at("qlora-json", _args(recipe, root / "out"))
    work = root / ".out.partial"
    saved = torch.load(work / "qlora_ckpt.pt", weights_only=True)
    assert saved["epochs_done"] == 2 and '"epochs_done": 1' in (work / "ckpt.json").read_text()
    res = _cli(_args(recipe, root / "out"))
    assert res.returncode == 0, res.stderr
    _assert_like_reference(root, reference)
    history = json.loads((root / "out" / "manifest.json").read_text())["qlora"]["loss_history"]
    # resumed: epochs 1-2 are the killed run's records (their measured seconds included), not re-trained
    assert history[:2] == saved["history"] and len(history) == 3
