"""Fixtures for the serving tests.

- ``tiny_served``: a ServedModel over the tiny PyTorch UNet from tests/helpers (8x8, 10 classes
  + null class 10): fast enough for every abuse test.
- ``engine_artifact``: a real calibrated artifact (builtin:digits, minmax w8a8, tiny settings)
  with an ONNX Runtime engine, built once per session (~15 s).
- ``gated_artifact``: a copy of it whose engine carries a *fixture* ``parity.json`` (passed, and
  naming the engine's current files). The gate itself is computed and tested by ``validate``'s
  own tests; here it is only an input to the server.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

CALIBRATED_FOR = {"samplers": ["ddim", "dpm-solver-2"], "steps": 3, "spacing": "quadratic"}
TINY_CAL = {"calibration.num_samples": 4, "calibration.steps": 3, "reconstruction.iters": 4,
            "reconstruction.max_inputs": 48, "reconstruction.batch_size": 8, "calibration.method": "minmax",
            "quant.bits": "w8a8"}


class CountingEps:
    """Wraps an eps model: counts calls, records batch sizes, and can hold calls until released."""

    def __init__(self, inner, *, hold: bool = False):
        self.inner = inner
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, x, t, cond=None, /):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        self.entered.set()
        if not self.release.wait(30):
            raise TimeoutError("test never released the engine")
        return self.inner(x, t, cond)


def tiny_loaded(kind: str = "class"):
    from diffusers import DDPMScheduler

    from saq_deploy.models.loading import LoadedModel
    from tests.helpers import tiny_unet2d, tiny_unet_cond

    unet = (tiny_unet_cond() if kind == "text" else tiny_unet2d(11 if kind == "class" else None)).eval()
    sched = dict(DDPMScheduler(num_train_timesteps=1000).config)
    return LoadedModel(name=f"tiny-{kind}", unet=unet, scheduler_config=sched, unet_dir=Path("."),
                       source_hash="0" * 64, num_classes=10 if kind == "class" else None,
                       null_label=10 if kind == "class" else None)


def make_served(kind: str = "class", *, hold: bool = False, gate=None):
    from saq_deploy.serve.model import from_loaded

    loaded = tiny_loaded(kind)
    eps = CountingEps(loaded.eps_model(), hold=hold)
    am = {"calibrated_for": CALIBRATED_FOR, "method": "minmax", "bits": "w8a8", "state_sha256": "f" * 64}
    served = from_loaded(loaded, eps, backend="torch", artifact_manifest=am, gate=gate)
    return served, eps


@contextlib.contextmanager
def client_for(served, **config):
    from fastapi.testclient import TestClient

    from saq_deploy.serve import ServeConfig, create_app

    app = create_app(served, ServeConfig(**config))
    with TestClient(app, raise_server_exceptions=False) as c:
        c.app_state = app.state
        yield c


@pytest.fixture
def tiny_served():
    torch.manual_seed(0)
    return make_served("class")


def write_fixture_gate(engine_dir: Path, *, passed: bool = True, files: dict | None = None) -> None:
    """FIXTURE parity.json for server tests (not a real validation result)."""
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    (engine_dir / "parity.json").write_text(json.dumps({
        "passed": passed, "engine_files": manifest["files"] if files is None else files,
        "thresholds": manifest.get("parity", {}), "metrics": {"fixture": True},
        "validated_at": "test-fixture"}))


@pytest.fixture(scope="session")
def engine_artifact(tmp_path_factory) -> Path:
    from saq_deploy.backends import build_engine
    from saq_deploy.calibrate.recipe import Recipe
    from saq_deploy.calibrate.run import calibrate

    out = tmp_path_factory.mktemp("serve") / "w8a8"
    calibrate(Recipe().with_overrides(TINY_CAL), out)
    build_engine(out)
    return out


@pytest.fixture
def ungated_artifact(engine_artifact, tmp_path) -> Path:
    """A private copy (tests may tamper with it) without a parity gate result."""
    dst = tmp_path / "art"
    shutil.copytree(engine_artifact, dst, ignore=shutil.ignore_patterns("parity.json"))
    return dst


@pytest.fixture
def gated_artifact(ungated_artifact) -> Path:
    write_fixture_gate(ungated_artifact / "engine")
    return ungated_artifact
