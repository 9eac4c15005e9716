"""A real `saq-deploy serve` process on a free loopback port: auth, a correct PNG, and a graceful
SIGTERM that lets the in-flight request finish."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="serving tests need the 'serve' extra (pip install -e '.[serve]')")

httpx = pytest.importorskip("httpx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stderr.read()}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server never became ready")


@pytest.mark.slow
def test_real_server_auth_png_and_graceful_shutdown(gated_artifact, tmp_path):
    key = "test-token-" + "x" * 24
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "saq_deploy.cli.app", "serve", str(gated_artifact), "--port",
                             str(port), "--api-key-file", str(key_file), "--log-level", "warning", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_ready(base, proc)
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.post(f"{base}/v1/generate", json={"label": 1}, timeout=30).status_code == 401
        r = httpx.post(f"{base}/v1/generate", json={"label": 8, "seed": 3},
                       headers={**auth, "Accept": "image/png"}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(r.content))
        assert img.size == (16, 16) and img.mode == "L"
        assert "server" not in {k.lower() for k in r.headers}  # no version banner

        slow: dict = {}

        def long_request():
            slow["r"] = httpx.post(f"{base}/v1/generate", json={"n": 16, "steps": 30, "seed": 1},
                                   headers=auth, timeout=120)

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(1.0)
        assert t.is_alive()  # still in flight when the signal arrives
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert slow["r"].status_code == 200 and len(slow["r"].json()["images"]) == 16  # drained, not dropped
        rc = proc.wait(60)
        assert rc in (0, -signal.SIGTERM), proc.stderr.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
