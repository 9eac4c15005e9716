"""Real TensorRT: build the reference model's engine from a calibrated artifact, load and run it on
torch CUDA tensors, check the manifest, the audit and the load checks, and run the parity gate
against the fake-quant model. Skipped (with the reason) unless `import tensorrt` works and a CUDA
GPU is present (tests/conftest.py); nothing here is mocked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.trt, pytest.mark.gpu, pytest.mark.slow]

PROFILES = Path(__file__).resolve().parents[2] / "engines" / "profiles"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from tests.helpers import minmax_artifact

    return minmax_artifact(tmp_path_factory.mktemp("trt-real") / "w8a8", 8, 5)


def _profile(tmp: Path, *, version_compatible: bool = False) -> Path:
    """engines/profiles/digits.toml with the timing cache under ``tmp``."""
    text = (PROFILES / "digits.toml").read_text()
    text = text.replace('timing_cache = "engines/timing.cache"', f"timing_cache = {json.dumps(str(tmp / 't.cache'))}")
    if version_compatible:
        text = text.replace("version_compatible = false", "version_compatible = true")
    f = tmp / ("vc.toml" if version_compatible else "profile.toml")
    f.write_text(text)
    return f


@pytest.fixture(scope="module")
def engine_dir(artifact, tmp_path_factory):
    from saq_deploy.backends.build import build_engine

    tmp = tmp_path_factory.mktemp("trt-engine")
    return build_engine(artifact, "tensorrt", tmp / "digits", profile=_profile(tmp))


def test_manifest_records_version_gpu_profile_and_hashes(engine_dir, artifact):
    import tensorrt as trt

    from saq_deploy.utils.io import sha256_file

    m = json.loads((engine_dir / "manifest.json").read_text())
    b = m["build"]
    major, minor = torch.cuda.get_device_capability()
    assert b["tensorrt"] == trt.__version__
    assert b["gpu"] == {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    assert b["profile"]["name"] == "digits" and len(b["profile"]["sha256"]) == 64
    assert b["flags"]["strongly_typed"] and b["onnx_file"] == "model.fp16.onnx"
    assert b["onnx_sha256"] == sha256_file(artifact / "onnx" / "tensorrt" / "model.fp16.onnx")
    assert m["source"]["state_sha256"] == json.loads((artifact / "manifest.json").read_text())["state_sha256"]
    assert m["shapes"]["max_batch"] == 128 and b["min_batch"] == 2
    assert b["timing_cache"]["saved_bytes"] > 0 and b["build_time_s"] > 0


def test_audit_shows_int8_compute(engine_dir):
    audit = json.loads((engine_dir / "audit.json").read_text())
    assert audit["detailed"] and audit["layers"] > 0
    assert "INT8" in audit["compute_precision"], audit["compute_precision"]


def test_runner_on_cuda_tensors(engine_dir, artifact):
    from saq_deploy.backends.engine import load_engine
    from saq_deploy.calibrate.artifact import load_artifact
    from saq_deploy.errors import ConfigError

    eng = load_engine(engine_dir)
    eps = eng.eps_model()
    x = torch.randn(3, 1, 16, 16, device="cuda")  # batch 3 >= the profile minimum 2
    t = torch.full((3,), 500.0, device="cuda")
    c = torch.tensor([1, 2, 10], device="cuda")
    out = eps(x, t, c)
    assert out.is_cuda and out.shape == x.shape and out.dtype == torch.float32
    ref = load_artifact(artifact).eps_model()(x.cpu(), t.cpu(), c.cpu())
    cos = torch.nn.functional.cosine_similarity(out.cpu().flatten(), ref.flatten(), dim=0)
    assert cos > 0.99, float(cos)
    one = eps(x[:1], t[:1], c[:1])  # below the minimum batch: padded, then sliced
    assert torch.allclose(one, out[:1], atol=5e-3)
    with pytest.raises(ConfigError, match="exceeds the engine's maximum"):
        eng.runner.run({"sample": torch.zeros(129, 1, 16, 16), "timestep": torch.zeros(129),
                        "class_labels": torch.zeros(129, dtype=torch.long)}, (129, 1, 16, 16))


def test_cuda_graph_replay_matches_direct(engine_dir):
    import tensorrt as trt

    from saq_deploy.backends.tensorrt import TrtRunner

    feeds = {"sample": torch.randn(4, 1, 16, 16, device="cuda"), "timestep": torch.full((4,), 250.0, device="cuda"),
             "class_labels": torch.arange(4, device="cuda")}
    direct = TrtRunner(engine_dir / "model.plan", trt).run(feeds, (4, 1, 16, 16))
    graphed = TrtRunner(engine_dir / "model.plan", trt, cuda_graph=True)
    first = graphed.run(feeds, (4, 1, 16, 16))
    again = graphed.run(feeds, (4, 1, 16, 16))  # replay
    assert torch.equal(first, again) and torch.allclose(first, direct, atol=1e-5)


def test_mismatched_manifest_is_refused(engine_dir, tmp_path):
    from saq_deploy.backends.engine import load_engine
    from saq_deploy.errors import ConfigError, ModelLoadError

    copy = tmp_path / "copy"
    shutil.copytree(engine_dir, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["build"]["tensorrt"] = "10.0.0.0-other"
    from saq_deploy.utils.io import seal_manifest

    (copy / "manifest.json").write_text(json.dumps(seal_manifest(m)))  # as if built elsewhere
    with pytest.raises(ModelLoadError, match="TensorRT version"):
        load_engine(copy)
    with pytest.raises(ConfigError, match="only allowed for version-compatible"):
        load_engine(copy, force=True)


def test_parity_gate_against_fake_quant(engine_dir, artifact, tmp_path):
    from saq_deploy.validate.run import validate_engine

    res = validate_engine(artifact, "tensorrt", engine=engine_dir, n=8, steps=5, quality_n=0,
                          out_dir=tmp_path, log=lambda *a: None)
    assert res["passed"], res["failures"]
    assert (engine_dir / "parity.json").exists()


def test_version_compatible_build_loads_with_host_code(artifact, tmp_path):
    from saq_deploy.backends.build import build_engine
    from saq_deploy.backends.engine import load_engine

    out = build_engine(artifact, "tensorrt", tmp_path / "vc", profile=_profile(tmp_path, version_compatible=True))
    m = json.loads((out / "manifest.json").read_text())
    assert m["build"]["flags"]["version_compatible"]
    eng = load_engine(out, force=True)  # allowed: the plan is version-compatible
    x = torch.randn(2, 1, 16, 16, device="cuda")
    assert eng.eps_model()(x, torch.full((2,), 10.0, device="cuda"), torch.tensor([0, 10], device="cuda")).is_cuda
