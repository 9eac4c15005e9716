"""Serving a real ONNX Runtime engine: the parity gate decides readiness, hashes are checked at
start-up, /v1/model describes what is served, and the calibrated envelope is enforced."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from saq_deploy.cli.app import main
from saq_deploy.errors import ConfigError, ModelLoadError
from saq_deploy.serve import load_served
from tests.serve.conftest import client_for, write_fixture_gate

pytest.importorskip("fastapi", reason="serving tests need the 'serve' extra (pip install -e '.[serve]')")


def serve_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", *args])
    return exc.value.code, capsys.readouterr().err


def test_gated_engine_is_ready_and_describes_itself(gated_artifact):
    import onnxruntime

    served = load_served(gated_artifact, "onnxruntime")
    assert served.gate.passed and served.backend == "onnxruntime"
    with client_for(served) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        r = c.get("/v1/model")
        info = r.json()
        assert info["model"]["name"] == "builtin:digits" and info["model"]["kind"] == "class"
        assert info["model"]["sample_shape"] == [1, 16, 16] and info["model"]["num_classes"] == 10
        manifest = json.loads((gated_artifact / "manifest.json").read_text())
        assert info["calibration"] == {"method": "minmax", "bits": "w8a8", "state_sha256": manifest["state_sha256"],
                                       "calibrated_for": {"samplers": ["ddim", "dpm-solver-2"], "steps": 3,
                                                          "spacing": "quadratic"}}
        assert info["engine"]["backend"] == "onnxruntime"
        assert info["engine"]["runtime_version"] == onnxruntime.__version__
        assert info["gate"]["passed"] is True and info["gate"]["metrics"] == {"fixture": True}
        assert info["limits"]["max_n"] == 16 and info["samplers"][0] == "ddim"
        assert str(gated_artifact) not in r.text and "/tmp" not in r.text  # no filesystem paths
        assert c.get("/openapi.json").json()["paths"].keys() >= {"/v1/generate", "/readyz", "/healthz", "/v1/model"}

        r = c.post("/v1/generate", json={"label": 2, "n": 1, "seed": 0}, headers={"Accept": "image/png"})
        assert r.status_code == 200 and "X-SAQ-Warning" not in r.headers
        img = Image.open(io.BytesIO(r.content))
        assert img.size == (16, 16) and img.mode == "L"
        body = c.post("/v1/generate", json={"n": 3, "seed": 0}).json()
        assert body["in_envelope"] and body["sampler"] == "ddim" and body["steps"] == 3
        assert body["spacing"] == "quadratic" and body["labels"] == [0, 1, 2] and body["warnings"] == []


def test_envelope_warning_and_strict_refusal(gated_artifact):
    served = load_served(gated_artifact, "onnxruntime")
    out = {"label": 1, "sampler": "unipc", "steps": 5, "seed": 0}
    with client_for(served) as c:
        r = c.post("/v1/generate", json=out)
        assert r.status_code == 200 and r.json()["in_envelope"] is False
        warning = r.headers["X-SAQ-Warning"]
        assert "sampler 'unipc' is outside the calibrated envelope (ddim, dpm-solver-2)" in warning
        assert "steps=5 is outside the calibrated envelope (3)" in warning
        r = c.post("/v1/generate", json={"label": 1, "sampler": "dpm-solver-2", "steps": 3, "spacing": "linspace"})
        assert "spacing 'linspace'" in r.headers["X-SAQ-Warning"]
    with client_for(served, strict=True) as c:
        r = c.post("/v1/generate", json=out)
        assert r.status_code == 422 and "outside the calibrated envelope" in r.json()["error"]
        assert "--strict" in r.json()["error"]
        assert c.post("/v1/generate", json={"label": 1, "sampler": "dpm-solver-2"}).status_code == 200


@pytest.mark.parametrize("gate, reason", [
    (None, "no parity gate result"),
    ({"passed": False}, "FAILED its parity gate"),
    ({"files": {"model.onnx": "0" * 64}}, "stale parity gate"),
    ("garbage", "cannot be read"),
])
def test_ungated_engine_is_not_ready_and_refuses(ungated_artifact, gate, reason):
    engine = ungated_artifact / "engine"
    if gate == "garbage":
        (engine / "parity.json").write_text("{not json")
    elif gate is not None:
        write_fixture_gate(engine, **gate)
    served = load_served(ungated_artifact, "onnxruntime")
    assert served.gate.required and not served.gate.passed and reason in served.gate.reason
    with client_for(served) as c:
        assert c.get("/healthz").status_code == 200  # alive, but
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False and reason in r.json()["reason"]
        r = c.post("/v1/generate", json={"label": 1})
        assert r.status_code == 503 and r.json()["error"].startswith("not ready") and reason in r.json()["error"]
        assert c.app_state.batcher.stats.jobs == 0


def test_allow_ungated_serves_with_a_loud_header(ungated_artifact, caplog):
    served = load_served(ungated_artifact, "onnxruntime")
    with caplog.at_level("WARNING", logger="saq_deploy.serve"), client_for(served, allow_ungated=True) as c:
        r = c.get("/readyz")
        assert r.status_code == 200 and "UNGATED" in r.headers["X-SAQ-Warning"]
        r = c.post("/v1/generate", json={"label": 4, "seed": 0})
        assert r.status_code == 200 and "UNGATED ENGINE" in r.headers["X-SAQ-Warning"]
        assert "UNGATED" in c.get("/v1/model").headers["X-SAQ-Warning"]
    assert any("UNGATED" in rec.getMessage() for rec in caplog.records)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target, fragment", [
    ("engine/model.onnx", "does not match the hash in its manifest"),
    ("calibrated.safetensors", "does not match the hash in its manifest"),
    ("engine/manifest.json", "different calibration"),
    ("engine/manifest.json:unsealed", "was edited"),
])
def test_refuses_to_start_on_mismatched_hashes(gated_artifact, target, fragment, capsys):
    from saq_deploy.utils.io import seal_manifest

    path = gated_artifact / target.split(":")[0]
    if ".json" in target:
        m = json.loads(path.read_text())
        m["source"]["state_sha256"] = "0" * 64
        # resealed: a consistent engine of another calibration; unsealed: a hand-edited manifest
        path.write_text(json.dumps(m if target.endswith(":unsealed") else seal_manifest(m)))
    else:
        _flip_byte(path)
    with pytest.raises(ModelLoadError, match=fragment):
        load_served(gated_artifact, "onnxruntime")
    rc, err = serve_cli([str(gated_artifact), "--port", "1"], capsys)
    assert rc == 1 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_wrong_backend_and_bad_options(gated_artifact, capsys, tmp_path):
    with pytest.raises(ConfigError, match="built for onnxruntime, not tensorrt"):
        load_served(gated_artifact, "tensorrt", engine=gated_artifact / "engine")
    short = tmp_path / "key"
    short.write_text("short")
    for args, fragment, code in [
        (["--api-key-file", str(short)], "shorter than 16 characters", 1),
        (["--api-key-file", str(tmp_path / "nope")], "does not exist", 1),
        (["--max-batch", "0"], "--max-batch must be >= 1", 2),  # a bad option value: usage error
        (["--max-n", "1000"], "--max-n must be in 1..64", 2),
        (["--backend", "torch", "--engine", str(gated_artifact / "engine")], "--engine applies to", 1),
    ]:
        rc, err = serve_cli([str(gated_artifact), *args], capsys)
        assert rc == code and fragment in err and len(err.strip().splitlines()) == 1, (args, err)


def test_torch_backend_serves_the_fake_quant_model(ungated_artifact):
    served = load_served(ungated_artifact, "torch")  # no engine, no gate needed
    assert not served.gate.required
    with client_for(served) as c:
        assert c.get("/readyz").status_code == 200
        assert c.get("/v1/model").json()["engine"]["runtime"] == "torch"
        r = c.post("/v1/generate", json={"label": 5, "n": 2, "seed": 0})
        assert r.status_code == 200 and len(r.json()["images"]) == 2


def test_served_digits_are_the_requested_digits(gated_artifact):
    """Correct images, not just valid PNGs: the committed digit classifier reads back the labels."""
    import base64

    import numpy as np
    import torch

    from saq_deploy.eval.classifier import accuracy, load_classifier

    served = load_served(gated_artifact, "onnxruntime")
    with client_for(served) as c:
        body = c.post("/v1/generate", json={"n": 10, "steps": 10, "sampler": "ddim", "seed": 0}).json()
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in body["images"]])
    images = torch.from_numpy(pixels).float().div(127.5).sub(1).unsqueeze(1)  # PNG -> [-1, 1]
    assert body["labels"] == list(range(10))
    assert accuracy(load_classifier(), images, torch.tensor(body["labels"])) >= 0.8
