"""What the ONNX Runtime placement adds to the calibrated model (conv-output INT8, INT32 biases),
read back from the graph, and the reference that reproduces it.

Oracles: ONNX Runtime with all graph optimizations off runs the Q/DQ graph by its ONNX semantics
(DQ -> FP32 Conv -> Q/DQ); optimized, it fuses QLinearConv. Torch's own conv + round."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from saq_deploy.backends.int8_codes import saturates_signed_int8, to_unsigned
from saq_deploy.errors import ConfigError
from saq_deploy.export.placement import read_placement
from saq_deploy.export.qdq import quantize_conv_biases
from saq_deploy.quant.output_quant import deployed_numerics

CIN, COUT, XS, YS = 32, 32, 0.035, 0.03


def _graph(seed: int = 0, extra_q: bool = False) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(DQ int8 weight, FP32 bias) -> Q/DQ -> y, node names in the export's scope form."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-128, 128, size=(COUT, CIN, 3, 3)).astype(np.int8)
    ws = (np.abs(rng.normal(size=COUT)) * 0.002 + 0.001).astype(np.float32)
    b = (rng.normal(size=COUT) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(ws, "ws"),
             numpy_helper.from_array(np.zeros(COUT, np.int8), "wz"), numpy_helper.from_array(b, "unet.conv.bias"),
             numpy_helper.from_array(np.float32(XS), "xs"), numpy_helper.from_array(np.int8(0), "z"),
             numpy_helper.from_array(np.float32(YS), "ys")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "z"], ["xq"], name="in_Q"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "z"], ["xd"], name="in_DQ"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="w_DQ", axis=0),
             helper.make_node("Conv", ["xd", "wd", "unet.conv.bias"], ["/unet/conv/Conv_output_0_prequant"],
                              name="/unet/conv/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["/unet/conv/Conv_output_0_prequant", "ys", "z"], ["yq"], name="out_Q"),
             helper.make_node("DequantizeLinear", ["yq", "ys", "z"], ["y"], name="out_DQ")]
    outs = ["y"]
    if extra_q:  # a Q/DQ on something that is not a layer output (like TensorRT's residual inputs)
        nodes += [helper.make_node("Relu", ["y"], ["r"], name="/unet/Relu"),
                  helper.make_node("QuantizeLinear", ["r", "ys", "z"], ["rq"], name="r_Q"),
                  helper.make_node("DequantizeLinear", ["rq", "ys", "z"], ["rd"], name="r_DQ")]
        outs = ["rd"]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", CIN, 16, 16])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def _for_this_cpu(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph as build-engine hands it to ONNX Runtime here: on x86 without VNNI the fused u8 x s8
    kernels saturate these full-range weights, so the engines hold the same values as UINT8 zp 128."""
    if not saturates_signed_int8():
        return model
    unsigned = onnx.ModelProto()
    unsigned.CopyFrom(model)
    assert to_unsigned(unsigned) > 0
    return unsigned


def _run(model: onnx.ModelProto, x: np.ndarray, optimized: bool) -> np.ndarray:
    model = _for_this_cpu(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(8, CIN, 16, 16)).astype(np.float32)


def _flips(model: onnx.ModelProto, x: np.ndarray) -> int:
    """Outputs where fused (optimized) ONNX Runtime and the graph's own semantics differ by a step."""
    return int((np.abs(_run(model, x, True) - _run(model, x, False)) / YS > 0.5).sum())


def test_int32_biases_make_fused_onnxruntime_match_the_graph_semantics(tmp_path):
    x = _x()
    # negative control: with an FP32 bias, ONNX Runtime's fusion rounds it itself, unseen
    plain = _flips(_graph(), x)
    fixed = _graph()
    assert quantize_conv_biases(fixed, ["/unet/conv/Conv_output_0_prequant"]) == 1
    # what is left: FP32 accumulation order of the unfused path (measured 1 of 65,536; plain 42)
    assert plain >= 10 and _flips(fixed, x) <= plain // 8, (plain, _flips(fixed, x))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(_for_this_cpu(fixed).SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert "QLinearConv" in {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}  # still fused


def test_read_placement_and_the_torch_reference_reproduce_the_graph():
    model = _graph(extra_q=True)
    fp_bias = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "unet.conv.bias"))
    quantize_conv_biases(model, ["/unet/conv/Conv_output_0_prequant"])
    pl = read_placement(model)
    assert pl.output_scales == {"conv": pytest.approx(YS)}
    assert set(pl.biases) == {"conv"} and pl.not_modelled == ["r"]
    step = XS * numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "ws"))
    assert np.abs(pl.biases["conv"] - fp_bias).max() <= 0.5 * step.max() * 1.001  # rounded, not replaced
    assert not np.array_equal(pl.biases["conv"], fp_bias)
    # the torch reference: the same conv with the same integer weight, input and output rounding
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    net = torch.nn.Sequential()
    net.add_module("conv", torch.nn.Conv2d(CIN, COUT, 3, padding=1))
    with torch.no_grad():
        net.conv.weight.copy_(torch.from_numpy(inits["w"].astype(np.float32) * inits["ws"].reshape(-1, 1, 1, 1)))
        net.conv.bias.copy_(torch.from_numpy(fp_bias.copy()))
    own_bias = net.conv.bias.detach().clone()
    x = _x(2)
    xq = torch.clamp(torch.round(torch.from_numpy(x) / XS), -128, 127) * XS
    with deployed_numerics(net, pl.output_scales, pl.biases), torch.no_grad():
        ref = net(xq).numpy()
    want = _run(model, x, optimized=False)
    relu_ref = np.clip(np.round(np.maximum(ref, 0) / YS), -128, 127) * YS
    assert np.abs(relu_ref - want).max() <= YS * 1.0001 and (np.abs(relu_ref - want) > YS / 2).mean() < 1e-3
    assert torch.equal(net.conv.bias, own_bias)  # restored on exit
    with torch.no_grad():
        plain = net(xq).numpy()
    assert not np.allclose(plain, ref)  # outside the context: no output rounding


def test_deployed_numerics_refuses_a_graph_of_another_model():
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1))
    with pytest.raises(ConfigError, match="does not have"), deployed_numerics(net, {"conv": 0.1}):
        pass
    with pytest.raises(ConfigError, match="shape"), deployed_numerics(net, {}, {"0": np.zeros(5, np.float32)}):
        pass
