"""A regular (non-editable) install must ship everything the package reads at run time.

The editable install used by the test suite finds files straight from the source tree, so a
package-data glob that misses a file (the reference UNet lives in a subfolder) only shows in a
built wheel. This builds one, installs it into a bare folder and loads the built-in model from
there, in a subprocess whose cwd is not the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: the venv's setuptools builds it, so no index is needed
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    (whl,) = out.glob("saq_deploy-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_ships_every_reference_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    weights = ROOT / "saq_deploy" / "reference" / "weights"
    tracked = subprocess.run(["git", "ls-files", str(weights)], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked, "no reference files tracked by git"
    missing = [f for f in tracked if f not in names]
    assert not missing, f"the wheel lacks {missing}"


@pytest.mark.slow
def test_installed_wheel_loads_builtin_model(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    code = ("import saq_deploy, torch\n"
            "from saq_deploy.models.loading import load_model\n"
            "m = load_model('builtin:digits')\n"
            "print(saq_deploy.__file__)\n"
            "x = torch.zeros(1, *m.sample_shape)\n"
            "print('x'.join(map(str, m.eps_model()(x, torch.tensor([500]), torch.tensor([3])).shape)))\n")
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    where, shape = p.stdout.split()[:2]
    from saq_deploy.models.loading import load_model

    expected_shape = load_model("builtin:digits").sample_shape
    assert Path(where).is_relative_to(target), f"imported {where}, not the installed wheel"
    # eps has the sample's shape: the weights were found and the UNet ran
    assert shape == "x".join(map(str, (1, *expected_shape)))
