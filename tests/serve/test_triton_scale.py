"""Serving at scale, as far as a machine without Docker or Triton allows (docs/design/distributed.md §6):
tritonclient's own request builder produces requests that the exported config.pbtxt (parsed by
Triton's ModelConfig schema) accepts, a malformed one is refused by the same check, and the
replicated compose example publishes one port in front of several replicas."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from saq_deploy.serve.triton import config_pbtxt

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                         reason="Triton's model-config schema needs tritonclient[grpc] (the 'triton' extra)")
grpcclient = pytest.importorskip("tritonclient.grpc")
grpc_utils = pytest.importorskip("tritonclient.grpc._utils")
text_format = pytest.importorskip("google.protobuf.text_format")

DOCKER = Path(__file__).resolve().parents[2] / "docker"
# the digits engine's manifest layout, as export_triton reads it (tests/serve/test_serve_triton.py
# checks the same fields on a real export)
MANIFEST = {
    "backend": "onnxruntime", "engine_file": "model.onnx",
    "inputs": [{"name": "sample", "dtype": "float32", "shape": ["B", 1, 16, 16]},
               {"name": "timestep", "dtype": "float32", "shape": ["B"]},
               {"name": "class_labels", "dtype": "int64", "shape": ["B"]}],
    "outputs": [{"name": "eps", "dtype": "float32", "shape": ["B", 1, 16, 16]}],
    "source": {"state_sha256": "ab" * 32, "method": "sa-ptq", "bits": "w8a8"},
    "model_meta": {"calibrated_for": {"samplers": ["ddim"], "steps": 10, "spacing": "quadratic"}},
}
NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32}


def _config():
    cfg = mc.ModelConfig()
    text_format.Parse(config_pbtxt(MANIFEST, name="digits_unet", max_batch_size=8), cfg)
    return cfg


def _request(inputs: dict[str, np.ndarray]):
    """A ModelInferRequest built by tritonclient itself (what InferenceServerClient.infer sends)."""
    built = []
    for name, arr in inputs.items():
        dtype = next(k for k, v in NUMPY.items() if v == arr.dtype)
        i = grpcclient.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        built.append(i)
    return grpc_utils._get_inference_request(
        model_name="digits_unet", inputs=built, model_version="", request_id="", outputs=[
            grpcclient.InferRequestedOutput("eps")], sequence_id=0, sequence_start=False, sequence_end=False,
        priority=0, timeout=None, parameters=None)


def violations(cfg, req) -> list[str]:
    """Triton's checks of a request against a model config (names, dtypes, batch, dims, byte size)."""
    problems = []
    want = {i.name: i for i in cfg.input}
    got = {i.name: (i, raw) for i, raw in zip(req.inputs, req.raw_input_contents, strict=True)}
    if set(got) != set(want):
        problems.append(f"inputs {sorted(got)} != {sorted(want)}")
    for name, (inp, raw) in got.items():
        spec = want.get(name)
        if spec is None:
            continue
        dtype = mc.DataType.Name(spec.data_type).removeprefix("TYPE_")
        if inp.datatype != dtype:
            problems.append(f"{name}: datatype {inp.datatype} != {dtype}")
            continue
        shape = list(inp.shape)
        if not 1 <= shape[0] <= cfg.max_batch_size:
            problems.append(f"{name}: batch {shape[0]} outside 1..{cfg.max_batch_size}")
        if len(shape) - 1 != len(spec.dims) or any(d not in (-1, s) for d, s in zip(spec.dims, shape[1:],
                                                                                   strict=False)):
            problems.append(f"{name}: shape {shape[1:]} does not fit dims {list(spec.dims)}")
        if len(raw) != int(np.prod(shape)) * np.dtype(NUMPY[dtype]).itemsize:
            problems.append(f"{name}: {len(raw)} bytes for shape {shape}")
    outs = {o.name for o in cfg.output}
    problems += [f"unknown output {o.name}" for o in req.outputs if o.name not in outs]
    return problems


def test_tritonclient_request_fits_the_exported_config():
    cfg = _config()
    b = 4
    # (B,) timesteps and labels travel as (B, 1): the config's dims [1] plus reshape [] (what the
    # ONNX graph takes), so the client sends [B, 1]
    ok = _request({"sample": np.zeros((b, 1, 16, 16), np.float32), "timestep": np.full((b, 1), 500.0, np.float32),
                   "class_labels": np.arange(b, dtype=np.int64).reshape(b, 1)})
    assert violations(cfg, ok) == []
    assert [i.name for i in ok.inputs] == ["sample", "timestep", "class_labels"]
    bad_dtype = _request({"sample": np.zeros((b, 1, 16, 16), np.float32), "timestep": np.zeros((b, 1), np.float32),
                          "class_labels": np.zeros((b, 1), np.int32)})
    assert violations(cfg, bad_dtype) == ["class_labels: datatype INT32 != INT64"]
    too_big = _request({"sample": np.zeros((9, 1, 32, 32), np.float32), "timestep": np.zeros((9, 1), np.float32),
                        "class_labels": np.zeros((9, 1), np.int64)})
    problems = violations(cfg, too_big)
    assert any("batch 9" in p for p in problems) and any("sample: shape [1, 32, 32]" in p for p in problems)


def test_replicated_compose_has_one_port_and_several_replicas():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    doc = yaml.safe_load((DOCKER / "compose.triton.yaml").read_text())
    triton, lb = doc["services"]["triton"], doc["services"]["lb"]
    replicas = re.fullmatch(r"\$\{SAQ_TRITON_REPLICAS:-(\d+)\}", str(triton["deploy"]["replicas"]))
    assert replicas and int(replicas.group(1)) > 1
    assert "ports" not in triton and lb["ports"] == ["127.0.0.1:8100:8100", "127.0.0.1:8101:8101"]
    assert any(v.endswith(":/models:ro") for v in triton["volumes"])
    assert "--strict-model-config=true" in triton["command"]  # Triton reads our config.pbtxt, infers nothing
    assert lb["depends_on"]["triton"]["condition"] == "service_healthy"
    conf = (DOCKER / "triton-nginx.conf").read_text()
    assert "server triton:8000;" in conf and "server triton:8001;" in conf
    assert "proxy_pass http://triton_http;" in conf and "grpc_pass grpc://triton_grpc;" in conf
