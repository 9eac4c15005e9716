"""TensorRT logic that needs no TensorRT: load checks (check_compat), network typing per version,
the precision audit over a documented-format inspector JSON, lint refusal, and the error paths
of build/load/inspect on a machine without TensorRT. None of this tests TensorRT itself: the
real builds are in tests/integration/test_tensorrt_real.py (marked trt, skipped without it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from saq_deploy.backends.tensorrt import audit_layers, check_compat, format_audit, typing_plan
from saq_deploy.errors import BackendUnavailableError, ConfigError, ModelLoadError
from saq_deploy.utils.io import seal_manifest
from tests.conftest import _has_cuda, _has_tensorrt

NO_TRT = pytest.mark.skipif(_has_tensorrt() and _has_cuda(), reason="TensorRT and a GPU are present here")
H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def built(version="10.3.0", gpu=H100, vc=False):
    return {"tensorrt": version, "gpu": dict(gpu), "flags": {"version_compatible": vc}}


def running(version="10.3.0", gpu=H100):
    return {"tensorrt": version, "gpu": dict(gpu)}


# --- check_compat ----------------------------------------------------------------------------------

def test_compat_match():
    assert check_compat(built(), running(), force=False) == []
    assert check_compat(built(vc=True), running(), force=True) == []


@pytest.mark.parametrize("run, what", [
    (running(version="10.5.0"), "TensorRT version"),
    (running(gpu={"name": "NVIDIA H100 PCIe", "compute_capability": "9.0"}), "GPU"),
    (running(gpu={"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}), "compute capability"),
])
def test_compat_mismatch_fails_clearly(run, what):
    with pytest.raises(ModelLoadError) as e:
        check_compat(built(), run, force=False)
    msg = str(e.value)
    assert "\n" not in msg and what in msg and "rebuild it with saq-deploy build-engine" in msg
    assert "TensorRT 10.3.0 on NVIDIA H100 80GB HBM3 (sm 9.0)" in msg  # what the plan was built with
    assert "--force" not in msg  # not version-compatible: force is no way out


def test_force_only_for_version_compatible():
    with pytest.raises(ConfigError, match="--force is only allowed for version-compatible engines"):
        check_compat(built(vc=False), running(version="10.5.0"), force=True)
    with pytest.raises(ConfigError, match="only allowed for version-compatible"):
        check_compat(built(vc=False), running(), force=True)  # even when nothing differs


def test_version_compatible_mismatch_suggests_force():
    with pytest.raises(ModelLoadError, match="load it with --force"):
        check_compat(built(vc=True), running(version="10.5.0"), force=False)


def test_force_version_compatible_newer_runtime():
    notes = check_compat(built(vc=True), running(version="10.5.0.18"), force=True)
    assert len(notes) == 1 and "version-compatible" in notes[0]
    notes = check_compat(built(vc=True), running(version="11.1.0"), force=True)
    assert any("major version" in n for n in notes)
    same_arch = {"name": "NVIDIA H100 PCIe", "compute_capability": "9.0"}
    assert check_compat(built(vc=True), running(gpu=same_arch), force=True)


def test_force_is_forward_only_and_same_arch():
    with pytest.raises(ModelLoadError, match="forward only"):
        check_compat(built(version="10.5.0", vc=True), running(version="10.3.0"), force=True)
    with pytest.raises(ModelLoadError, match="tied to the GPU architecture"):
        check_compat(built(vc=True), running(gpu={"name": "NVIDIA L40S", "compute_capability": "8.9"}),
                     force=True)


# --- network typing per TensorRT version ------------------------------------------------------------

def test_typing_plan():
    assert typing_plan("10.3.0", True, "fp16") == {"strongly_typed": True, "creation_flag": True,
                                                  "builder_flags": []}
    assert typing_plan("11.1.0", True, "fp16") == {"strongly_typed": True, "creation_flag": False,
                                                  "builder_flags": []}
    assert typing_plan("11.0.0", False, "fp32")["strongly_typed"]
    weak = typing_plan("9.3.0", False, "fp16")
    assert not weak["strongly_typed"] and weak["builder_flags"] == ["INT8", "FP16"]
    assert typing_plan("9.3.0", False, "fp32")["builder_flags"] == ["INT8"]


# --- precision audit ------------------------------------------------------------------------------

def _t(name, fmt, dims=(2, 64, 8, 8)):
    return {"Name": name, "Location": "Device", "Dimensions": list(dims), "Format/Datatype": fmt}


I8 = "Thirty-two wide channel vectorized row major Int8 format."
F16 = "Channel major FP16 format where channel % 8 == 0"
F32 = "Row major linear FP32"

# Hand-written in the documented engine-inspector format (TensorRT developer guide, "Engine
# Inspector": get_engine_information(LayerInformationFormat.JSON) with ProfilingVerbosity.DETAILED;
# field names as the TensorRT Engine Explorer reads them). NOT output of a real TensorRT build.
INSPECTOR_FIXTURE = {
    "Layers": [
        {"Name": "Reformatting CopyNode for Input Tensor 0 to conv_in", "LayerType": "Reformat",
         "ParameterType": "Reformat", "Inputs": [_t("sample", F32)], "Outputs": [_t("sample_f16", F16)],
         "Origin": "REFORMAT"},
        {"Name": "conv_in_input_Q", "LayerType": "Scale", "ParameterType": "Scale",
         "Inputs": [_t("sample_f16", F16)], "Outputs": [_t("x_q", I8)]},
        {"Name": "conv_in + down_blocks.0.resnets.0.conv1", "LayerType": "CaskConvolution",
         "ParameterType": "Convolution", "Inputs": [_t("x_q", I8)], "Outputs": [_t("h", I8)],
         "Kernel": [3, 3], "Weights": {"Type": "Int8", "Count": 36864}, "Bias": {"Type": "Float", "Count": 64},
         "TacticName": "sm90_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs_vect_c_32"},
        {"Name": "group_norm + silu", "LayerType": "PointWiseV2", "ParameterType": "PointWise",
         "Inputs": [_t("h", F16)], "Outputs": [_t("g", F16)]},
        {"Name": "to_q_weight_DQ + to_q/MatMul", "LayerType": "gemm", "ParameterType": "MatrixMultiply",
         "Inputs": [_t("g", F16, (2, 64, 64))], "Outputs": [_t("q", F16, (2, 64, 64))],
         "Weights": {"Type": "Int4", "Count": 4096}},
        {"Name": "time_embedding.linear_1", "LayerType": "CaskGemm", "ParameterType": "Convolution",
         "Inputs": [_t("temb", F32, (2, 32))], "Outputs": [_t("temb1", F32, (2, 128))],
         "Weights": {"Type": "Float", "Count": 4096}},
        {"Name": "conv_out_weight_DQ", "LayerType": "Dequantize", "ParameterType": "Dequantize",
         "Inputs": [_t("w_q", I8)], "Outputs": [_t("w", F16)]},
        {"Name": "conv_out", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
         "Inputs": [_t("g", F16)], "Outputs": [_t("eps_f16", F16)], "Weights": {"Type": "Half", "Count": 576}},
        {"Name": "Reformatting CopyNode for Output Tensor 0", "LayerType": "Reformat", "ParameterType": "Reformat",
         "Inputs": [_t("eps_f16", F16)], "Outputs": [_t("eps", F32)]},
        {"Name": "Reformatting layout only", "LayerType": "Reformat", "ParameterType": "Reformat",
         "Inputs": [_t("a", F16)], "Outputs": [_t("b", "Row major linear FP16 format")]},
        {"Name": "aux stream signal", "LayerType": "signal", "Inputs": [], "Outputs": []},
        {"Name": "conv_out [profile 1]", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
         "Inputs": [_t("g", F16)], "Outputs": [_t("eps", F16)], "Weights": {"Type": "Half", "Count": 576}},
    ],
    "Bindings": ["sample", "timestep", "class_labels", "eps"],
}


def test_audit_of_documented_format_fixture():
    a = audit_layers(INSPECTOR_FIXTURE)
    assert a["detailed"] and a["layers"] == 10  # signal and the second profile's copy are not counted
    lp = {k: v["count"] for k, v in a["layer_precision"].items()}
    assert lp == {"FP16": 5, "FP32": 2, "INT8": 2, "INT4": 1}
    assert a["layer_precision"]["FP16"]["share"] == 0.5
    # compute layers: the two convs, the INT4 weight-only GEMM, the FP32 Linear
    cp = {k: v["count"] for k, v in a["compute_precision"].items()}
    assert a["compute_layers"] == 4 and cp == {"INT8": 1, "INT4": 1, "FP32": 1, "FP16": 1}
    w = a["weights"]
    assert w["total"] == 36864 + 4096 + 4096 + 576
    assert {k: v["count"] for k, v in w["by_type"].items()} == {"INT8": 36864, "INT4": 4096, "FP32": 4096,
                                                                 "FP16": 576}
    assert a["reformat_layers"] == 3
    assert [(c["from"], c["to"]) for c in a["reformat_conversions"]] == [("FP32", "FP16"), ("FP16", "FP32")]
    assert [(q["role"], q["name"]) for q in a["unfused_qdq"]] == [("Quantize", "conv_in_input_Q"),
                                                                  ("Dequantize", "conv_out_weight_DQ")]
    assert a["bindings"] == ["sample", "timestep", "class_labels", "eps"]
    text = format_audit(a)
    assert "compute layers: 4" in text and "INT8 25.0% (1)" in text and "unfused Q/DQ layers: 2" in text
    assert "  FP32 -> FP16: Reformatting CopyNode for Input Tensor 0 to conv_in" in text
    json.dumps(a)  # stored as audit.json


def test_audit_without_detailed_verbosity_and_bad_input():
    a = audit_layers({"Layers": ["conv_in", "conv_out"], "Bindings": []})
    assert a == {"format": "saq-deploy-trt-audit", "version": 1, "layers": 2, "detailed": False,
                 "note": a["note"]}
    assert "DETAILED" in format_audit(a)
    with pytest.raises(ModelLoadError, match="'Layers' list"):
        audit_layers({"layers": []})
    assert audit_layers({"Layers": []})["layers"] == 0


# --- lint refusal, build/load error paths (CPU only) ---------------------------------------------

def _qdq_conv(path: Path, zero_point: int) -> Path:
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
             numpy_helper.from_array(np.array(zero_point, np.int8), "zx"),
             numpy_helper.from_array(np.ones((1, 1, 3, 3), np.int8), "w"),
             numpy_helper.from_array(np.full(1, 0.01, np.float32), "sw")]
    nodes = [helper.make_node("QuantizeLinear", ["sample", "sx", "zx"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xdq"], name="dq"),
             helper.make_node("DequantizeLinear", ["w", "sw"], ["wdq"], name="dq_w", axis=0),
             helper.make_node("Conv", ["xdq", "wdq"], ["eps"], name="conv", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("sample", TP.FLOAT, ["B", 1, 16, 16])],
                              [helper.make_tensor_value_info("eps", TP.FLOAT, ["B", 1, 16, 16])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), str(path))
    return path


EM = {"inputs": [{"name": "sample", "dtype": "float32", "shape": ["B", 1, 16, 16]}],
      "model_meta": {"sample_shape": [1, 16, 16], "kind": "uncond"}, "calibrated": {"state_sha256": "x"}}


def test_lint_errors_refuse_the_build_before_tensorrt(tmp_path):
    from saq_deploy.backends.tensorrt import build, refuse_lint_errors

    refuse_lint_errors(_qdq_conv(tmp_path / "ok.onnx", 0))  # clean: no error
    bad = _qdq_conv(tmp_path / "bad.onnx", 3)
    with pytest.raises(ModelLoadError) as e:
        build(tmp_path, tmp_path, EM, profile=None, onnx_file=bad)
    msg = str(e.value)
    assert "\n" not in msg and "fails the TensorRT Q/DQ lint with 2 error(s) (zero-point-nonzero)" in msg
    assert f"saq-deploy lint {bad} --target tensorrt" in msg
    assert not list(tmp_path.glob("*.plan"))


def test_build_profile_errors_come_first(tmp_path):
    from saq_deploy.backends.tensorrt import build

    with pytest.raises(ConfigError, match="does not exist"):
        build(tmp_path, tmp_path, EM, profile=tmp_path / "missing.toml")
    with pytest.raises(ModelLoadError, match="model.fp16.onnx"):
        build(tmp_path, tmp_path, EM, profile=None)


@NO_TRT
def test_load_engine_without_tensorrt_is_one_line(tmp_path):
    from saq_deploy.backends.engine import load_engine

    (tmp_path / "manifest.json").write_text(json.dumps(seal_manifest({
        "artifact": "saq-deploy-engine", "backend": "tensorrt", "engine_file": "model.plan", "files": {},
        "build": {**built(), "profile": {"resolved": {"cuda_graph": False}}}})))
    with pytest.raises(BackendUnavailableError) as e:
        load_engine(tmp_path)
    assert "\n" not in str(e.value) and "nvcr.io/nvidia/tensorrt" in str(e.value)


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    from tests.helpers import minmax_artifact

    return minmax_artifact(tmp_path_factory.mktemp("trt") / "w8a8", 4, 3)


@pytest.mark.slow
@NO_TRT
def test_build_engine_without_tensorrt_leaves_nothing(tiny_artifact, tmp_path, monkeypatch):
    from saq_deploy.backends.build import build_engine

    monkeypatch.chdir(tmp_path)  # nothing may land under the working directory either
    before = sorted(p.name for p in tiny_artifact.iterdir())
    profile = Path(__file__).resolve().parents[2] / "engines" / "profiles" / "digits.toml"
    with pytest.raises(BackendUnavailableError) as e:
        build_engine(tiny_artifact, "tensorrt", profile=profile)
    assert "\n" not in str(e.value) and "pip install -e '.[tensorrt]'" in str(e.value)
    assert not (tmp_path / "engines").exists()
    assert sorted(p.name for p in tiny_artifact.iterdir()) == before  # no export, no engine folder
    with pytest.raises(ConfigError, match="optimization_level must be 0..5"):  # profile checked first
        bad = tmp_path / "bad.toml"
        bad.write_text("[build]\noptimization_level = 9\n")
        build_engine(tiny_artifact, "tensorrt", profile=bad)


@pytest.mark.slow
def test_real_export_passes_the_tensorrt_lint(tiny_artifact):
    from saq_deploy.backends.build import ensure_export
    from saq_deploy.backends.tensorrt import refuse_lint_errors

    folder = ensure_export(tiny_artifact, "tensorrt")
    for f in ("model.onnx", "model.fp16.onnx"):
        refuse_lint_errors(folder / f)


def test_inspect_prints_a_stored_audit(tmp_path, capsys):
    from saq_deploy.cli.app import main

    (tmp_path / "audit.json").write_text(json.dumps(audit_layers(INSPECTOR_FIXTURE)))
    (tmp_path / "manifest.json").write_text(json.dumps(seal_manifest({
        "artifact": "saq-deploy-engine", "backend": "tensorrt", "engine_file": "model.plan", "files": {},
        "build": {**built(), "profile": {"name": "digits"}, "onnx_file": "model.fp16.onnx"}})))
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tmp_path)])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.startswith("TensorRT 10.3.0 engine for NVIDIA H100 80GB HBM3 (sm 9.0), profile digits")
    assert "unfused Q/DQ layers: 2" in out
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path), "--json"])
    assert json.loads(capsys.readouterr().out)["layers"] == 10
    (tmp_path / "audit.json").unlink()
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tmp_path)])
    assert e.value.code == 1 and "audit.json' is missing" in capsys.readouterr().err


def test_tensorrt_backend_imports_without_tensorrt():
    code = ("import sys, saq_deploy.backends.tensorrt, saq_deploy.cli.inspect; "
            "sys.exit(1 if 'tensorrt' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
