"""Unsigned INT8 codes for CPUs whose u8 x s8 kernels saturate: the rule, and the rewrite's exactness
(oracle: ONNX Runtime running both graphs unfused, i.e. DequantizeLinear + float ops)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from saq_deploy.backends import int8_codes
from saq_deploy.errors import ModelLoadError


@pytest.mark.parametrize(("machine", "flags", "expected"), [
    ("x86_64", {"avx2", "fma"}, True),  # AMD Zen 3 / Intel Haswell: vpmaddubsw saturates
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, True),  # AVX-512 without VNNI (Skylake-SP)
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, False),
    ("x86_64", {"avx2", "avx_vnni"}, False),
    ("AMD64", {"avx2"}, True),
    ("aarch64", {"asimd"}, False),
])
def test_which_cpus_saturate(machine, flags, expected):
    assert int8_codes.saturates_signed_int8(machine, flags) is expected


def test_unknown_flags_keep_signed_codes(tmp_path):
    assert int8_codes.cpu_flags(tmp_path / "no-cpuinfo") is None
    (tmp_path / "cpuinfo").write_text("processor : 0\nflags\t\t: fpu avx2 avx512_vnni\n")
    assert int8_codes.cpu_flags(tmp_path / "cpuinfo") == {"fpu", "avx2", "avx512_vnni"}


def _qdq_graph(seed: int = 0) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv (per-channel int8 weights, 5 output channels) -> Q/DQ -> MatMul of two
    activations (a Q/DQ on each side), int8 zero points 0 as our export writes them."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, size=(5, 3, 3, 3), dtype=np.int8)
    inits = [nh.from_array(w, "w_q"), nh.from_array(rng.uniform(0.01, 0.02, 5).astype(np.float32), "w_s"),
             nh.from_array(np.zeros(5, np.int8), "w_zp"), nh.from_array(np.float32(0.03), "x_s"),
             nh.from_array(np.int8(0), "zp"), nh.from_array(np.float32(0.05), "y_s")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["y", "y_s", "zp"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_s", "zp"], ["yd"]),
             helper.make_node("Transpose", ["yd"], ["yt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["yd", "yt"], ["out"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 5, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray, fused: bool) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_unsigned_codes_dequantize_to_the_same_values():
    signed = _qdq_graph()
    unsigned = onnx.ModelProto()
    unsigned.CopyFrom(signed)
    assert int8_codes.to_unsigned(unsigned) == 5  # every Q and DQ node
    kinds = {i.name: i.data_type for i in unsigned.graph.initializer}
    assert TensorProto.INT8 not in kinds.values()
    w = {i.name: nh.to_array(i) for i in unsigned.graph.initializer}
    np.testing.assert_array_equal(w["w_q"].astype(np.int16) - 128, nh.to_array(signed.graph.initializer[0]))
    onnx.checker.check_model(unsigned, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32) * 2
    exact = _run(signed, x, fused=False)
    np.testing.assert_array_equal(_run(unsigned, x, fused=False), exact)  # same math, bit for bit
    fused = _run(unsigned, x, fused=True)  # ORT's integer kernels on u8 x u8: exact accumulation
    assert np.abs(fused - exact).max() <= 1e-3 * np.abs(exact).max()


def test_nonzero_zero_points_and_float_graphs_are_left_alone():
    m = _qdq_graph()
    zp = next(i for i in m.graph.initializer if i.name == "w_zp")
    zp.CopyFrom(nh.from_array(np.full(5, 3, np.int8), "w_zp"))
    assert int8_codes.to_unsigned(m) == 4  # the weight DQ keeps its codes; activations change
    assert next(i for i in m.graph.initializer if i.name == "w_q").data_type == TensorProto.INT8


def test_signed_engine_refused_in_one_line_where_it_saturates(monkeypatch, tmp_path):
    monkeypatch.setattr(int8_codes, "saturates_signed_int8", lambda *a, **k: True)
    with pytest.raises(ModelLoadError) as e:
        int8_codes.check_codes(tmp_path, {"int8_codes": "signed"}, "ONNX Runtime")
    assert "\n" not in str(e.value) and "rebuild it here" in str(e.value)
    with pytest.raises(ModelLoadError):  # an engine from before the field: signed codes
        int8_codes.check_codes(tmp_path, {}, "ONNX Runtime")
    int8_codes.check_codes(tmp_path, {"int8_codes": "unsigned"}, "ONNX Runtime")
    monkeypatch.setattr(int8_codes, "saturates_signed_int8", lambda *a, **k: False)
    int8_codes.check_codes(tmp_path, {"int8_codes": "signed"}, "ONNX Runtime")
