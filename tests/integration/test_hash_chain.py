"""The hash chain of a calibrated artifact: byte-reproducible state files, and every consumer
re-verifying the state, the behaviour-deciding manifest fields and recipe.json before use."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saq_deploy.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    from tests.helpers import minmax_artifact

    return minmax_artifact(tmp_path_factory.mktemp("chain") / "w8a8", 4, 3)


@pytest.fixture
def copy(artifact, tmp_path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(artifact, dst)
    return dst


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_SAVE = """
import sys, torch
from saq_deploy.utils.io import save_safetensors
t = {f"w{i}": torch.arange(6, dtype=torch.float32).reshape(2, 3) * i for i in range(5)}
meta = {k: str(i) for i, k in enumerate(("format", "version", "behaviour", "alpha", "zeta", "mid", "b"))}
save_safetensors(t, sys.argv[1], metadata=meta)
"""


def test_safetensors_bytes_identical_across_processes(tmp_path):
    """The library keeps metadata in a hash map whose order changes per process; ours must not."""
    outs = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"s{seed}.safetensors"
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", _SAVE, str(out)], check=True, env=env, cwd=ROOT)
        outs.append(_sha(out))
    assert len(set(outs)) == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s1.safetensors"), framework="pt") as f:
        assert f.metadata()["zeta"] == "4" and f.get_tensor("w2")[1, 2].item() == 10.0


def test_calibrated_state_file_is_byte_reproducible(tmp_path):
    """Two calibrations with the same recipe in two processes (different hash seeds, same thread
    count: float reductions depend on it) write the same file bytes, so every downstream hash agrees."""
    code = ("import sys; from pathlib import Path; from tests.helpers import minmax_artifact; "
            "minmax_artifact(Path(sys.argv[1]), 4, 3)")
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / seed)], check=True, env=env, cwd=ROOT,
                       capture_output=True)
    assert _sha(tmp_path / "1" / "calibrated.safetensors") == _sha(tmp_path / "2" / "calibrated.safetensors")
    m1, m2 = (json.loads((tmp_path / s / "manifest.json").read_text()) for s in ("1", "2"))
    assert m1["state_sha256"] == m2["state_sha256"]


def test_truncated_state_refused_by_build_engine_with_cached_export(copy):
    from saq_deploy.backends.build import build_engine

    build_engine(copy, "onnxruntime")  # caches the export
    state = copy / "calibrated.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    shutil.rmtree(copy / "engine")
    with pytest.raises(ModelLoadError, match="does not match the hash"):
        build_engine(copy, "onnxruntime")
    assert not (copy / "engine").exists()


@pytest.mark.parametrize("field,value", [("bits", "w4a4"), ("method", "sa-ptq")])
def test_edited_manifest_field_refused(copy, field, value):
    from saq_deploy.backends.build import build_engine
    from saq_deploy.calibrate.artifact import load_artifact

    mf = copy / "manifest.json"
    m = json.loads(mf.read_text())
    m[field] = value
    mf.write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match=f"{field}.*manifest was edited"):
        build_engine(copy, "onnxruntime")
    with pytest.raises(ModelLoadError, match=field):
        load_artifact(copy)


def test_edited_quant_config_refused(copy):
    from saq_deploy.api import verify_artifact

    mf = copy / "manifest.json"
    m = json.loads(mf.read_text())
    m["quant_config"]["act"]["bits"] = 4
    mf.write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match="quant_config"):
        verify_artifact(copy)


@pytest.mark.parametrize("change", ["delete", "edit"])
def test_recipe_json_is_verified(copy, change):
    from saq_deploy.calibrate.artifact import load_artifact

    recipe = copy / "recipe.json"
    if change == "delete":
        recipe.unlink()
    else:
        recipe.write_text(recipe.read_text().replace('"minmax"', '"brecq"'))
    with pytest.raises(ModelLoadError, match="recipe.json"):
        load_artifact(copy)


def test_cli_export_refuses_edited_bits(copy, capsys):
    from saq_deploy.cli.app import main

    mf = copy / "manifest.json"
    m = json.loads(mf.read_text())
    m["bits"] = "w4a4"
    mf.write_text(json.dumps(m))
    with pytest.raises(SystemExit) as e:
        main(["export", str(copy)])
    assert e.value.code == 1
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "bits" in errors[0]
    assert not (copy / "onnx").exists()


def test_edited_engine_thresholds_refused(copy):
    """The parity thresholds travel in the engine manifest: loosening them by hand is refused."""
    from saq_deploy.backends.build import build_engine
    from saq_deploy.backends.engine import load_engine

    engine = build_engine(copy, "onnxruntime")
    assert load_engine(engine).manifest["parity"]["min_psnr_db"] == 32.0  # W8A8 gate
    mf = engine / "manifest.json"
    m = json.loads(mf.read_text())
    m["parity"]["min_psnr_db"] = 0.0
    mf.write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match="was edited"):
        load_engine(engine)
