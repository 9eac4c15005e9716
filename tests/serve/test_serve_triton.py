"""`saq-deploy export-triton`: the config parses with Triton's own ModelConfig protobuf schema and
names the engine's inputs, outputs, dtypes and dynamic batch."""

from __future__ import annotations

import json

import pytest

from saq_deploy.cli.app import main
from saq_deploy.errors import ConfigError, ModelLoadError
from saq_deploy.serve.triton import config_pbtxt, export_triton

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                         reason="Triton's model-config schema needs tritonclient[grpc] (the 'triton' extra)")
text_format = pytest.importorskip("google.protobuf.text_format")


def parse(text: str):
    cfg = mc.ModelConfig()
    text_format.Parse(text, cfg)
    return cfg


def test_export_onnxruntime_repository(gated_artifact, tmp_path, capsys):
    repo = tmp_path / "model_repository"
    with pytest.raises(SystemExit) as e:
        main(["export-triton", str(gated_artifact), "-o", str(repo), "--name", "digits_unet"])
    assert e.value.code == 0, capsys.readouterr().err
    model_dir = repo / "digits_unet"
    cfg = parse((model_dir / "config.pbtxt").read_text())
    assert cfg.name == "digits_unet" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 16
    ins = {i.name: i for i in cfg.input}
    assert list(ins) == ["sample", "timestep", "class_labels"]
    assert ins["sample"].data_type == mc.TYPE_FP32 and list(ins["sample"].dims) == [1, 16, 16]
    for name, dtype in (("timestep", mc.TYPE_FP32), ("class_labels", mc.TYPE_INT64)):
        assert ins[name].data_type == dtype and list(ins[name].dims) == [1]
        assert ins[name].HasField("reshape") and list(ins[name].reshape.shape) == []  # (B,) tensors
    (out,) = cfg.output
    assert out.name == "eps" and out.data_type == mc.TYPE_FP32 and list(out.dims) == [1, 16, 16]
    assert cfg.HasField("dynamic_batching")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [1, 2, 4, 8, 16]
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    state = json.loads((gated_artifact / "manifest.json").read_text())["state_sha256"]
    assert cfg.parameters["saq_state_sha256"].string_value == state
    assert json.loads(cfg.parameters["saq_calibrated_for"].string_value)["steps"] == 3

    import onnx

    model = onnx.load(str(model_dir / "1" / "model.onnx"))
    graph_inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                    for i in model.graph.input}
    for name, spec in ins.items():  # Triton's [batch] + dims (before reshape) match the graph
        want = graph_inputs[name][1:]
        assert (list(spec.dims) if not spec.HasField("reshape") else []) == want
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # the portable Q/DQ graph
    assert json.loads((model_dir / "saq_engine.json").read_text())["model_meta"]["num_classes"] == 10

    with pytest.raises(ConfigError, match="--force"):
        export_triton(gated_artifact, repo, name="digits_unet")
    export_triton(gated_artifact, repo, name="digits_unet", force=True, max_batch_size=4, instances=2)
    cfg = parse((model_dir / "config.pbtxt").read_text())
    assert cfg.max_batch_size == 4 and list(cfg.dynamic_batching.preferred_batch_size) == [1, 2, 4]
    assert cfg.instance_group[0].count == 2


def test_tensorrt_and_cross_attention_config():
    manifest = {
        "backend": "tensorrt", "engine_file": "model.plan",
        "inputs": [{"name": "sample", "dtype": "float32", "shape": ["B", 4, 64, 64]},
                   {"name": "timestep", "dtype": "float32", "shape": ["B"]},
                   {"name": "encoder_hidden_states", "dtype": "float16", "shape": ["B", 77, 768]}],
        "outputs": [{"name": "eps", "dtype": "float32", "shape": ["B", 4, 64, 64]}],
        "source": {"state_sha256": "ab" * 32, "method": "sa-ptq", "bits": "w8a8"},
        "model_meta": {"calibrated_for": {"samplers": ["ddim"], "steps": 20, "spacing": "quadratic"}},
    }
    cfg = parse(config_pbtxt(manifest, name="sd_unet", max_batch_size=8))
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 8
    ins = {i.name: i for i in cfg.input}
    assert list(ins["encoder_hidden_states"].dims) == [77, 768]
    assert ins["encoder_hidden_states"].data_type == mc.TYPE_FP16
    assert list(ins["sample"].dims) == [4, 64, 64]
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    dyn = dict(manifest, inputs=[{"name": "encoder_hidden_states", "dtype": "float32", "shape": ["B", "L", 768]}])
    assert list(parse(config_pbtxt(dyn, name="m", max_batch_size=2)).input[0].dims) == [-1, 768]


def test_export_refuses_tampered_engine_and_bad_options(gated_artifact, tmp_path):
    with pytest.raises(ConfigError, match="--name"):
        export_triton(gated_artifact, tmp_path, name="../evil")
    with pytest.raises(ConfigError, match="--instances"):
        export_triton(gated_artifact, tmp_path, instances=0)
    onnx_file = gated_artifact / "onnx" / "onnxruntime-cpu" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with pytest.raises(ModelLoadError, match="changed since the build"):
        export_triton(gated_artifact, tmp_path / "a")
    eng = gated_artifact / "engine" / "model.onnx"
    eng.write_bytes(eng.read_bytes()[:-1])
    with pytest.raises(ModelLoadError, match="does not match the hash"):
        export_triton(gated_artifact, tmp_path / "b")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
