"""`saq-deploy lint`: exit codes, text and JSON output, one-line errors for bad files."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from saq_deploy.cli.app import main


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def save_model(path, *, zero_point=0, conv_input="x_dq"):
    """x -> Q/DQ -> Conv(x_dq, DQ(int8 W per-channel)) -> y at opset 20: clean for TensorRT."""
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
        numpy_helper.from_array(np.array(zero_point, np.int8), "zx"),
        numpy_helper.from_array(np.ones((4, 4, 3, 3), np.int8), "w"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "sw"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "sx", "zx"], ["x_dq"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w", "sw"], ["w_dq"], name="dq_w", axis=0),
        helper.make_node("Conv", [conv_input, "w_dq"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    if conv_input != "x_dq":  # the Q/DQ on x is then unused by the conv: keep it alive as an output
        model.graph.output.append(helper.make_tensor_value_info("x_dq", TP.FLOAT, [1, 4, 8, 8]))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def test_clean_exits_0(capsys, tmp_path):
    rc, out, err = run_cli(["lint", str(save_model(tmp_path / "m.onnx"))], capsys)
    assert rc == 0 and out.strip() == "clean: no issues (target tensorrt)" and err == ""


def test_error_exits_1_with_rule(capsys, tmp_path):
    path = save_model(tmp_path / "m.onnx", zero_point=5)
    rc, out, _ = run_cli(["lint", str(path)], capsys)
    lines = out.strip().splitlines()
    assert rc == 1
    assert lines[0].startswith("ERROR zero-point-nonzero q_x: ")
    assert lines[-1].startswith("2 errors, 0 warnings")
    rc, out, _ = run_cli(["lint", str(path), "--target", "onnxruntime-cpu"], capsys)
    assert rc == 0 and "zero-point-nonzero" not in out  # ORT allows asymmetric zero points


def test_warning_passes_unless_strict(capsys, tmp_path):
    path = save_model(tmp_path / "m.onnx", conv_input="x")
    rc, out, _ = run_cli(["lint", str(path)], capsys)
    assert rc == 0 and "WARN unquantized-input conv: " in out and "0 errors, 1 warnings" in out
    rc, out, _ = run_cli(["lint", str(path), "--strict"], capsys)
    assert rc == 1 and "unquantized-input" in out


def test_ort_target_warns_conv_not_fused(capsys, tmp_path):
    path = save_model(tmp_path / "m.onnx")
    rc, out, _ = run_cli(["lint", "-t", "onnxruntime-cpu", str(path)], capsys)
    assert rc == 0 and "WARN conv-not-fused conv: " in out
    rc, _, _ = run_cli(["lint", "-t", "onnxruntime-cpu", "--strict", str(path)], capsys)
    assert rc == 1


def test_json_output_parses(capsys, tmp_path):
    path = save_model(tmp_path / "m.onnx", zero_point=5)
    rc, out, _ = run_cli(["lint", "--json", str(path)], capsys)
    issues = json.loads(out)
    assert rc == 1
    assert [(i["rule"], i["severity"], i["node"]) for i in issues] == [
        ("zero-point-nonzero", "error", "q_x"), ("zero-point-nonzero", "error", "dq_x")]
    rc, out, _ = run_cli(["lint", "--json", str(save_model(tmp_path / "ok.onnx"))], capsys)
    assert rc == 0 and json.loads(out) == []


def test_not_onnx_one_error_line(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage not onnx" * 10)
    rc, out, err = run_cli(["lint", str(bad)], capsys)
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err


def test_missing_file_exits_1(capsys, tmp_path):
    rc, _, err = run_cli(["lint", str(tmp_path / "missing.onnx")], capsys)
    assert rc == 1 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_unknown_target_is_usage_error(capsys, tmp_path):
    rc, _, err = run_cli(["lint", "-t", "tensorrt-llm", str(save_model(tmp_path / "m.onnx"))], capsys)
    assert rc == 2 and "tensorrt-llm" in err
