"""Q/DQ lint: a clean TensorRT-style graph passes; each rule fires on a one-change mutation of it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from saq_deploy.errors import ConfigError, ModelLoadError
from saq_deploy.export.lint import TARGETS, format_issues, lint_model, summary


def _f32(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _i8(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.int8), name)


def make_clean(int4: bool = True, opset: int | None = None) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(DQ(int8 W, per-channel axis 0)) + residual Add(DQ'd x) -> Reshape ->
    Q/DQ -> MatMul with DQ'd weight: int4 blocked (opset 21, block 64 along K) or int8 per-channel."""
    rng = np.random.default_rng(0)
    inits = [
        _f32("sx", 0.05), _i8("zx", 0),
        _i8("w", rng.integers(-127, 128, (4, 4, 3, 3))), _f32("sw", [0.01, 0.02, 0.03, 0.04]),
        _i8("zw", [0] * 4),
        _f32("b", np.zeros(4)), numpy_helper.from_array(np.array([2, 128], np.int64), "shape_r"),
        _f32("sa", 0.1), _i8("za", 0),
    ]
    if int4:
        inits += [helper.make_tensor("w2", TP.INT4, [128, 16], rng.integers(-8, 8, 128 * 16).tolist()),
                  _f32("sw2", np.full((2, 16), 0.02))]
        dq_w2 = helper.make_node("DequantizeLinear", ["w2", "sw2"], ["w2_dq"], name="dq_w2", axis=0,
                                 block_size=64)
    else:
        inits += [_i8("w2", rng.integers(-127, 128, (128, 16))), _f32("sw2", np.full(16, 0.02)),
                  _i8("zw2", [0] * 16)]
        dq_w2 = helper.make_node("DequantizeLinear", ["w2", "sw2", "zw2"], ["w2_dq"], name="dq_w2", axis=1)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "sx", "zx"], ["x_dq"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["w_dq"], name="dq_w", axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "x_dq"], ["s"], name="add"),
        helper.make_node("Reshape", ["s", "shape_r"], ["r"], name="reshape"),
        helper.make_node("QuantizeLinear", ["r", "sa", "za"], ["r_q"], name="q_a"),
        helper.make_node("DequantizeLinear", ["r_q", "sa", "za"], ["r_dq"], name="dq_a"),
        dq_w2,
        helper.make_node("MatMul", ["r_dq", "w2_dq"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(nodes, "clean", [helper.make_tensor_value_info("x", TP.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [2, 16])], inits)
    opset = opset or (21 if int4 else 20)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def set_init(model, tensor):
    inits = model.graph.initializer
    idx = next(i for i, t in enumerate(inits) if t.name == tensor.name)
    inits[idx].CopyFrom(tensor)


def add_init(model, tensor):
    model.graph.initializer.append(tensor)


def set_opset(model, version):
    model.opset_import[0].version = version


def rules(model, target="tensorrt", severity=None):
    return [i.rule for i in lint_model(model, target) if severity is None or i.severity == severity]


def check(model):
    onnx.checker.check_model(model, full_check=True)
    return model


# --- clean graphs --------------------------------------------------------------------------------

def test_clean_int4_graph_has_no_tensorrt_errors():
    m = check(make_clean())
    issues = lint_model(m, "tensorrt")
    assert [(i.rule, i.severity) for i in issues] == [("opset-range", "warning")]  # opset 21 > 20


def test_clean_int8_graph_at_opset_20_has_no_issues():
    assert lint_model(check(make_clean(int4=False)), "tensorrt") == []


def test_clean_graph_runs_on_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    m = check(make_clean())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.random.default_rng(1).standard_normal((1, 4, 8, 8), np.float32)})
    assert y.shape == (2, 16) and np.isfinite(y).all()


def test_lint_from_path_with_external_data(tmp_path):
    m = make_clean(int4=False)
    path = tmp_path / "m.onnx"
    onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    assert (tmp_path / "m.data").exists()
    assert lint_model(path) == [] and lint_model(str(path)) == []


# --- TensorRT rules ------------------------------------------------------------------------------

def test_opset_too_low():
    m = helper.make_model(helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q"),
         helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq")], "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [4])],
        [_f32("s", 0.1)]), opset_imports=[helper.make_opsetid("", 11)], ir_version=7)
    issues = lint_model(check(m))
    assert [(i.rule, i.severity, i.node) for i in issues] == [("opset-range", "error", "model")]
    set_opset(m, 13)
    assert lint_model(check(m)) == []


def test_opset_too_high_is_error_and_above_20_is_warning():
    m = make_clean()
    set_opset(m, 26)
    assert rules(check(m), severity="error") == ["opset-range"]
    set_opset(m, 22)
    assert rules(check(m)) == ["opset-range"] and rules(m, severity="warning") == ["opset-range"]


def test_int4_below_opset_21():  # invalid ONNX on purpose: block_size/INT4 need opset 21
    m = make_clean()
    set_opset(m, 20)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(m, full_check=True)
    issues = [i for i in lint_model(m) if i.severity == "error"]
    assert [(i.rule, i.node) for i in issues] == [("opset-range", "dq_w2")]
    assert [(i.rule, i.node) for i in lint_model(m, "onnxruntime-cpu") if i.severity == "error"] == \
        [("opset-range", "dq_w2")]


def test_zero_point_nonzero():
    m = make_clean(int4=False)
    set_init(m, _i8("zx", 3))
    issues = lint_model(check(m))
    found = {(i.rule, i.node) for i in issues}
    assert found >= {("zero-point-nonzero", "q_x"), ("zero-point-nonzero", "dq_x")}
    assert "zero-point-nonzero" not in rules(m, "onnxruntime-cpu")  # ORT allows asymmetric


def test_zero_point_not_constant():
    m = make_clean(int4=False)
    m.graph.input.append(helper.make_tensor_value_info("zx_in", TP.INT8, []))
    node(m, "q_x").input[2] = "zx_in"
    assert ("zero-point-nonzero", "q_x") in [(i.rule, i.node) for i in lint_model(check(m))]


def test_scale_not_constant():
    m = make_clean(int4=False)
    m.graph.input.append(helper.make_tensor_value_info("sa_in", TP.FLOAT, []))
    node(m, "q_a").input[1] = "sa_in"
    for target in TARGETS:
        assert ("scale-not-constant", "q_a") in [(i.rule, i.node) for i in lint_model(check(m), target)]


def test_scale_from_constant_node_is_constant():
    m = make_clean(int4=False)
    m.graph.node.insert(0, helper.make_node("Constant", [], ["sa_c"], name="const_sa", value_float=0.1))
    node(m, "q_a").input[1] = node(m, "dq_a").input[1] = "sa_c"
    assert lint_model(check(m)) == []


@pytest.mark.parametrize("bad", [0.0, -0.01, float("nan"), float("inf")])
def test_scale_not_positive(bad):
    m = make_clean(int4=False)
    set_init(m, _f32("sw", [0.01, bad, 0.03, 0.04]))
    for target in TARGETS:
        assert ("scale-not-positive", "dq_w") in [(i.rule, i.node) for i in lint_model(check(m), target)]


def test_act_per_channel():
    m = make_clean(int4=False)
    add_init(m, _f32("sx4", [0.05] * 4))
    add_init(m, _i8("zx4", [0] * 4))
    for name in ("q_x", "dq_x"):
        n = node(m, name)
        n.input[1], n.input[2] = "sx4", "zx4"
        n.attribute.append(helper.make_attribute("axis", 1))
    issues = [(i.rule, i.node) for i in lint_model(check(m))]
    assert ("act-per-channel", "q_x") in issues and ("act-per-channel", "dq_x") in issues
    assert "act-per-channel" not in rules(make_clean(int4=False))  # per-channel weights are fine


def test_int4_on_conv():
    m = make_clean()
    rng = np.random.default_rng(2)
    set_init(m, helper.make_tensor("w", TP.INT4, [4, 4, 3, 3], rng.integers(-8, 8, 144).tolist()))
    set_init(m, helper.make_tensor("zw", TP.INT4, [4], [0] * 4))
    assert [(i.rule, i.node) for i in lint_model(check(m)) if i.severity == "error"] == \
        [("int4-on-non-gemm", "dq_w")]


def test_int4_activation():
    m = make_clean()
    set_init(m, helper.make_tensor("za", TP.INT4, [], [0]))
    assert [(i.rule, i.node) for i in lint_model(check(m)) if i.severity == "error"] == \
        [("int4-activation", "q_a")]


def test_block_size():
    m = make_clean()
    node(m, "dq_w2").attribute[1].i = 32  # attributes: axis, block_size
    set_init(m, _f32("sw2", np.full((4, 16), 0.02)))
    errors = [(i.rule, i.node) for i in lint_model(check(m)) if i.severity == "error"]
    assert errors == [("block-size", "dq_w2")]
    assert "block-size" not in rules(m, "onnxruntime-cpu")  # 32 is a power of two >= 16
    node(m, "dq_w2").attribute[1].i = 8
    set_init(m, _f32("sw2", np.full((16, 16), 0.02)))
    assert ("block-size", "dq_w2") in [(i.rule, i.node) for i in lint_model(check(m), "onnxruntime-cpu")]


def test_unquantized_conv_input():
    m = make_clean(int4=False)
    node(m, "conv").input[0] = "x"
    issues = lint_model(check(m))
    assert [(i.rule, i.node) for i in issues] == [("unquantized-input", "conv")]
    assert "'x'" in issues[0].message and "'w_dq'" not in issues[0].message


def test_unquantized_matmul_weight_and_activation():
    m = make_clean(int4=False)
    add_init(m, _f32("w2f", np.zeros((128, 16))))
    node(m, "matmul").input[1] = "w2f"
    assert ("unquantized-input", "matmul") in [(i.rule, i.node) for i in lint_model(check(m))]
    m = make_clean(int4=False)
    node(m, "matmul").input[0] = "r"
    assert ("unquantized-input", "matmul") in [(i.rule, i.node) for i in lint_model(check(m))]


def test_matmul_of_two_activations_not_flagged():
    m = make_clean(int4=False)
    m.graph.node.append(helper.make_node("Transpose", ["r"], ["rt"], name="tr", perm=[1, 0]))
    m.graph.node.append(helper.make_node("MatMul", ["r", "rt"], ["att"], name="qk"))
    m.graph.output.append(helper.make_tensor_value_info("att", TP.FLOAT, [2, 2]))
    assert lint_model(check(m)) == []


def test_matmul_of_two_activations_quantized_on_both_or_one_side():
    """Full-INT8 attention (Q/DQ on both inputs) is clean; Q/DQ on one input only is flagged."""
    m = make_clean(int4=False)
    m.graph.node.extend([helper.make_node("Transpose", ["r_dq"], ["rt"], name="tr", perm=[1, 0]),
                         helper.make_node("MatMul", ["r_dq", "rt"], ["att"], name="qk")])
    m.graph.output.append(helper.make_tensor_value_info("att", TP.FLOAT, [2, 2]))
    assert lint_model(check(m)) == [] and not [i for i in lint_model(m, "onnxruntime-cpu") if i.node in ("qk", "tr")]
    node(m, "tr").input[0] = "r"
    assert [(i.rule, i.node) for i in lint_model(check(m))] == [("unquantized-input", "qk")]


def test_residual_add_unquantized():
    m = make_clean(int4=False)
    node(m, "add").input[1] = "x"
    assert [(i.rule, i.node) for i in lint_model(check(m))] == [("residual-add-unquantized", "add")]


def test_add_of_two_convs_flagged():
    m = make_clean(int4=False)
    conv2 = helper.make_node("Conv", ["x_dq", "w_dq"], ["c2"], name="conv2", pads=[1, 1, 1, 1])
    m.graph.node.insert(4, conv2)
    node(m, "add").input[1] = "c2"
    assert ("residual-add-unquantized", "add") in [(i.rule, i.node) for i in lint_model(check(m))]


def test_dangling_q_unused():
    m = make_clean(int4=False)
    m.graph.node.append(helper.make_node("QuantizeLinear", ["r", "sa", "za"], ["r_q2"], name="q_extra"))
    for target in TARGETS:
        assert ("dangling-qdq", "q_extra") in [(i.rule, i.node) for i in lint_model(check(m), target)]


def test_dangling_q_feeds_non_dq():
    m = make_clean(int4=False)
    m.graph.node.append(helper.make_node("Relu", ["r_q"], ["r_relu"], name="relu_q"))
    m.graph.output.append(helper.make_tensor_value_info("r_relu", TP.INT8, [2, 128]))
    assert ("dangling-qdq", "q_a") in [(i.rule, i.node) for i in lint_model(check(m))]


def test_dangling_dq_of_graph_input():
    m = make_clean(int4=False)
    m.graph.input.append(helper.make_tensor_value_info("xi8", TP.INT8, [2, 128]))
    node(m, "dq_a").input[0] = "xi8"
    found = [(i.rule, i.node) for i in lint_model(check(m))]
    assert ("dangling-qdq", "dq_a") in found and ("dangling-qdq", "q_a") in found  # q_a is now unused


def test_qdq_pair_mismatch():
    m = make_clean(int4=False)
    add_init(m, _f32("sa2", 0.2))
    node(m, "dq_a").input[1] = "sa2"
    for target in TARGETS:
        assert ("qdq-pair-mismatch", "dq_a") in [(i.rule, i.node) for i in lint_model(check(m), target)]


# --- ONNX Runtime CPU rules ----------------------------------------------------------------------

def test_ort_conv_not_fused_and_fused():
    m = make_clean(int4=False)
    assert rules(check(m), "onnxruntime-cpu") == ["conv-not-fused"]
    # ORT style: Q/DQ on the conv output -> QLinearConv.
    m.graph.node.insert(4, helper.make_node("QuantizeLinear", ["c", "sa", "za"], ["c_q"], name="q_c"))
    m.graph.node.insert(5, helper.make_node("DequantizeLinear", ["c_q", "sa", "za"], ["c_dq"], name="dq_c"))
    node(m, "add").input[0] = "c_dq"
    assert rules(check(m), "onnxruntime-cpu") == []


def test_ort_fp16_on_cpu():
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"], name="add")], "g",
        [helper.make_tensor_value_info("x", TP.FLOAT16, [4])],
        [helper.make_tensor_value_info("y", TP.FLOAT16, [4])],
        [numpy_helper.from_array(np.zeros(4, np.float16), "b")]), opset_imports=[helper.make_opsetid("", 20)],
        ir_version=10)
    issues = lint_model(check(m), "onnxruntime-cpu")
    assert [(i.rule, i.node) for i in issues] == \
        [("fp16-on-cpu", "x"), ("fp16-on-cpu", "y"), ("fp16-on-cpu", "model")]
    assert "fp16-on-cpu" not in rules(m, "tensorrt")


# --- API -----------------------------------------------------------------------------------------

def test_order_format_and_summary():
    m = make_clean()
    node(m, "add").input[1] = "x"
    set_init(m, _i8("zx", 1))
    issues = lint_model(m)
    assert issues == lint_model(m)
    assert [i.node for i in issues] == ["model", "q_x", "dq_x", "add"]
    text = format_issues(issues).splitlines()
    assert text[0].startswith("WARN opset-range model: ")
    assert text[1].startswith("ERROR zero-point-nonzero q_x: ")
    assert summary(issues) == {"errors": 2, "warnings": 2, "by_rule": {
        "opset-range": 1, "residual-add-unquantized": 1, "zero-point-nonzero": 2}}
    assert all("\n" not in i.message for i in issues)


def test_bad_target_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown lint target"):
        lint_model(make_clean(), "tensorrt-llm")
    with pytest.raises(ModelLoadError, match="does not exist"):
        lint_model(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage not onnx" * 10)
    with pytest.raises(ModelLoadError):
        lint_model(junk)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        lint_model(empty)
