"""Our ONNX pass: put the calibrated artifact's scales into the FP graph as Q/DQ nodes.

One set of scales, two placements (docs/design/deployment.md §1.4 and §4.2):

- ``tensorrt``: Q/DQ on the inputs of every quantized Conv / Gemm / MatMul (activations per
  tensor, weights as int8 initializers + DequantizeLinear per output channel; INT4 blocked
  weights on GEMMs, opset 21); no output Q; the identity input of Adds fed by a conv is
  quantized too, so TensorRT can fuse the Add into the conv.
- both: Q/DQ on the four inputs of each quantized Attention module's two activation x activation
  MatMuls (q.k^T and probs.v, ``attention_matmul`` artifacts; see ``insert_attention_qdq``).
- ``onnxruntime-cpu``: the same input Q/DQ, plus an output Q/DQ after each quantized Conv so
  ONNX Runtime fuses DQ -> Conv -> Q into QLinearConv (without it the conv runs dequantized in
  FP32, slower than FP32). MatMul/Gemm need no output Q (MatMulIntegerToFloat / QGemm).

Scales the calibration never produced (conv outputs, residual inputs) are observed here, at
export, as absmax / 127 over inputs recorded along real sampling trajectories; the manifest says
so. Zero points are always 0 (symmetric), round half to even, as in the fake-quant model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from saq_deploy.errors import ConfigError
from saq_deploy.export.graph import GraphEditor, set_opset
from saq_deploy.export.plan import AttentionQuant, LayerQuant
from saq_deploy.export.torch_export import module_scope

TARGETS = ("tensorrt", "onnxruntime-cpu")
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
TRT_INT4_BLOCKS = (64, 128)


@dataclass
class QdqReport:
    target: str
    opset: int = 0
    layers: dict[str, dict] = field(default_factory=dict)  # name -> how it was exported
    observed: dict[str, float] = field(default_factory=dict)  # tensor -> export-time scale
    attention: dict[str, dict] = field(default_factory=dict)  # Attention module -> its quantized MatMuls
    not_represented: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        kinds: dict[str, int] = {}
        for info in self.layers.values():
            kinds[info["weights"]] = kinds.get(info["weights"], 0) + 1
        return {"target": self.target, "opset": self.opset, "weight_formats": kinds,
                "layers": self.layers, "attention": self.attention, "export_time_scales": len(self.observed),
                "not_represented": self.not_represented}


def find_layer_nodes(ed: GraphEditor, plan: list[LayerQuant]) -> dict[str, onnx.NodeProto]:
    """The one weighted node each quantized module became (matched by its name scope)."""
    by_scope: dict[str, list[onnx.NodeProto]] = {}
    for n in ed.graph.node:
        if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in ed.inits:
            scope = module_scope(n.name)
            if scope is not None:
                by_scope.setdefault(scope, []).append(n)
    found = {}
    for lq in plan:
        nodes = by_scope.get(lq.name, [])
        if len(nodes) != 1:
            raise ConfigError(f"cannot map quantized layer '{lq.name}' to one ONNX node (found {len(nodes)}); "
                              "the exported graph does not match the calibrated model")
        found[lq.name] = nodes[0]
    return found


def _weight_layout(node: onnx.NodeProto, lq: LayerQuant, w_shape: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """(codes laid out like the ONNX weight, transposed?): Conv [O,I,kh,kw], Gemm [O,I] when
    transB=1 else [I,O], MatMul [I,O]. Decided by the op, never by the shape (square weights)."""
    transposed = node.op_type == "MatMul" or (
        node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute))
    codes = np.ascontiguousarray(lq.codes.T) if transposed else lq.codes
    if tuple(codes.shape) != tuple(w_shape):
        raise ConfigError(f"layer '{lq.name}': weight shape {w_shape} in ONNX does not match the calibrated "
                          f"codes {tuple(lq.codes.shape)}")
    return codes, transposed


def _insert_weight(ed: GraphEditor, node: onnx.NodeProto, lq: LayerQuant, target: str, rep: QdqReport) -> bool:
    """Replace the FP weight by DQ(int weight); returns True if an INT4 tensor was written."""
    w_shape = tuple(ed.inits[node.input[1]].dims)
    codes, transposed = _weight_layout(node, lq, w_shape)
    int4 = False
    if lq.block_size:  # blocked INT4 GEMM weight: blocks run along the input (K) dimension
        if node.op_type == "Conv":
            raise ConfigError(f"layer '{lq.name}': block-quantized conv weights are not supported")
        if target == "tensorrt" and lq.block_size not in TRT_INT4_BLOCKS:
            raise ConfigError(f"layer '{lq.name}': TensorRT INT4 needs block 64 or 128, got {lq.block_size}")
        scale = lq.scale.T if transposed else lq.scale  # (O, I/bs) -> MatMul layout (I/bs, O)
        axis, int4, fmt = (0 if transposed else 1), True, f"int4-block{lq.block_size}"
        dq, out = ed.dq_weight(codes, np.ascontiguousarray(scale), int4=True, axis=axis,
                               block_size=lq.block_size, tag=lq.name)
    else:
        axis = 1 if transposed else 0
        fmt = "int8" if lq.weight_bits == 8 else f"int{lq.weight_bits}-codes-in-int8"
        dq, out = ed.dq_weight(codes, lq.scale.reshape(-1), int4=False, axis=axis, block_size=None, tag=lq.name)
    ed.insert_before(node, dq)
    node.input[1] = out
    rep.layers[lq.name] = {"op": node.op_type, "weights": fmt, "weight_bits": lq.weight_bits,
                           "act_bits": lq.act_bits, "node": node.name}
    return int4


def _act_dtype(bits: int, target: str) -> int:
    """INT8 (or INT4) activation codes, symmetric: the calibrated ActQuantizer's signed grid."""
    if bits == 4 and target == "tensorrt":
        raise ConfigError("4-bit activations (W4A4) are not a TensorRT mode (TensorRT's INT4 is weight-only); "
                          "export W4A4 for --target onnxruntime-cpu, or calibrate w4a8 for TensorRT")
    return TensorProto.INT4 if bits == 4 else TensorProto.INT8


def _qdq_input(ed: GraphEditor, node: onnx.NodeProto, idx: int, step: float, dtype: int, tag: str) -> None:
    q, dq, out = ed.qdq(node.input[idx], np.float32(step), dtype, tag=tag)
    ed.insert_before(node, q)
    ed.insert_before(node, dq)
    node.input[idx] = out


def _insert_act(ed: GraphEditor, node: onnx.NodeProto, lq: LayerQuant, target: str) -> bool:
    """Q/DQ on the node's data input with the calibrated step; returns True if INT4 activations."""
    if lq.act_bits is None:
        return False
    dtype = _act_dtype(lq.act_bits, target)
    _qdq_input(ed, node, 0, lq.act_step, dtype, f"{lq.name}_input")
    return dtype == TensorProto.INT4


def find_attention_matmuls(ed: GraphEditor, attention: list[AttentionQuant]) -> dict[str, tuple]:
    """(scores MatMul, probs.v MatMul) of each Attention module, by name scope: its only MatMuls
    with no initializer input (to_q etc. are child scopes); probs.v is the one reading the Softmax."""
    by_scope: dict[str, list[onnx.NodeProto]] = {}
    for n in ed.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and not any(i in ed.inits for i in n.input):
            scope = module_scope(n.name)
            if scope is not None:
                by_scope.setdefault(scope, []).append(n)
    found = {}
    for aq in attention:
        nodes = by_scope.get(aq.name, [])
        pv = [n for n in nodes if getattr(ed.producer.get(n.input[0]), "op_type", None) == "Softmax"]
        qk = [n for n in nodes if n not in pv]
        if len(nodes) != 2 or len(pv) != 1:
            raise ConfigError(f"cannot map the attention matmuls of '{aq.name}' to two ONNX MatMuls (found "
                              f"{len(nodes)}, {len(pv)} after a Softmax); the exported graph does not match "
                              "the calibrated model")
        found[aq.name] = (qk[0], pv[0])
    return found


def _score_input_factor(ed: GraphEditor, tensor: str, aq: AttentionQuant) -> float:
    """What the graph multiplies q (or k^T) by before the scores MatMul. The TorchScript exporter's
    scaled_dot_product_attention scales both by sqrt(head_dim ** -0.5), computed at run time from
    the shape (Shape -> Cast -> Sqrt -> Div(1, .) -> Sqrt, mirrored here in float32); a folded
    constant factor is read as is; no Mul means the scale sits after the MatMul."""
    p = ed.producer.get(tensor)
    if p is None or p.op_type != "Mul":
        return 1.0
    f = p.input[1]
    if f in ed.inits and ed.init_array(f).size == 1:
        return float(ed.init_array(f).reshape(-1)[0])
    if getattr(ed.producer.get(f), "op_type", None) == "Sqrt":
        return float(np.sqrt(np.float32(1.0) / np.sqrt(np.float32(aq.head_dim))))
    raise ConfigError(f"attention '{aq.name}': unexpected factor {f!r} before the scores MatMul; "
                      "the exported graph does not match the calibrated model")


def insert_attention_qdq(ed: GraphEditor, attention: list[AttentionQuant], target: str, rep: QdqReport) -> bool:
    """Q/DQ (per tensor, zero point 0) on both inputs of both attention MatMuls: what ONNX
    Runtime's QDQ MatMul fusion and TensorRT's INT8 MHA fusion look for. Returns True if INT4.

    The fake-quant model rounds q and k before SDPA's scale (fq(q) @ fq(k)^T * s); the graph's
    MatMul reads q * c and k^T * c, so those get step * c: round(q*c / (step*c)) = round(q / step),
    the same codes up to a ULP at a rounding tie. Softmax probs (in [0, 1]) stay signed INT8 too,
    codes 0..127: p_quant is the calibrated signed symmetric quantizer and the parity reference
    rounds on that grid (UINT8 would be another quantizer; TensorRT's Q/DQ is symmetric INT8)."""
    int4 = False
    matmuls = find_attention_matmuls(ed, attention)
    for aq in attention:
        qk, pv = matmuls[aq.name]
        dtype = _act_dtype(aq.act_bits, target)
        int4 |= dtype == TensorProto.INT4
        factors = [_score_input_factor(ed, qk.input[i], aq) for i in (0, 1)]
        for node, idx, qn, factor in ((qk, 0, "q_quant", factors[0]), (qk, 1, "k_quant", factors[1]),
                                      (pv, 0, "p_quant", 1.0), (pv, 1, "v_quant", 1.0)):
            _qdq_input(ed, node, idx, aq.steps[qn] * factor, dtype, f"{aq.name}_{qn}")
        rep.attention[aq.name] = {"matmuls": [qk.name, pv.name], "act_bits": aq.act_bits,
                                  "score_input_factor": factors}
        rep.not_represented.extend(f"{aq.name}: {n}" for n in aq.notes)
    return int4


def insert_layer_qdq(model: onnx.ModelProto, plan: list[LayerQuant], target: str) -> QdqReport:
    """Weights and input activations of every calibrated layer, and the attention matmul inputs of
    an ``ExportPlan`` (both targets)."""
    if target not in TARGETS:
        raise ConfigError(f"unknown export target '{target}'; choose one of {', '.join(TARGETS)}")
    rep = QdqReport(target)
    ed = GraphEditor(model)
    nodes = find_layer_nodes(ed, plan)
    needs_21 = False
    for lq in plan:
        node = nodes[lq.name]
        needs_21 |= _insert_weight(ed, node, lq, target, rep)
        needs_21 |= _insert_act(ed, node, lq, target)
        rep.not_represented.extend(f"{lq.name}: {n}" for n in lq.notes)
    needs_21 |= insert_attention_qdq(ed, getattr(plan, "attention", []), target, rep)
    ed.commit()
    if needs_21:
        set_opset(model, 21)  # INT4 tensors and block_size exist from opset 21
    return rep


def conv_outputs_to_quantize(model: onnx.ModelProto) -> list[str]:
    """Outputs of convs with DQ inputs that are not graph outputs (ORT needs them Q'd to fuse)."""
    ed = GraphEditor(model)
    graph_outs = {o.name for o in model.graph.output}
    out = []
    for n in model.graph.node:
        if n.op_type == "Conv" and all(_from_dq(ed, i) for i in n.input[:2]) and n.output[0] not in graph_outs:
            out.append(n.output[0])
    return out


def quantize_conv_biases(model: onnx.ModelProto, convs: list[str]) -> int:
    """INT32 bias (scale = input scale x per-channel weight scale, zero point 0) behind a DQ for
    each Conv whose output ``convs`` names: what QLinearConv runs. Left FP32, ONNX Runtime rounds it
    itself (WeightBiasQuantization) with rounding no graph shows, and the ~0.1 % of conv outputs it
    moves by one step cascade through the later quantizers (docs/results/parity.md). Written out,
    the reference reads the exact bias from the graph. Returns the number of biases quantized."""
    ed = GraphEditor(model)
    done = 0
    for n in model.graph.node:
        if n.op_type != "Conv" or n.output[0] not in convs or len(n.input) < 3 or n.input[2] not in ed.inits:
            continue
        x_dq, w_dq = ed.producer[n.input[0]], ed.producer[n.input[1]]
        xs, ws = ed.init_array(x_dq.input[1]), ed.init_array(w_dq.input[1])
        if xs.size != 1:
            continue
        bscale = (xs.astype(np.float32).reshape(()) * ws.astype(np.float32).reshape(-1)).astype(np.float32)
        bias = ed.init_array(n.input[2]).astype(np.float64)
        codes = np.clip(np.round(bias / bscale), -(2**31), 2**31 - 1).astype(np.int32)
        tag = f"{n.name}_bias"
        q = ed.add_init(f"{tag}_quantized", codes)
        sc = ed.add_init(f"{tag}_scale", bscale)
        z = ed.add_init(f"{tag}_zero_point", np.zeros(bscale.shape, dtype=np.int32))
        out = ed.unique(f"{tag}_dequantized")
        ed.insert_before(n, helper.make_node("DequantizeLinear", [q, sc, z], [out], name=ed.unique(f"{tag}_DQ"), axis=0))
        n.input[2] = out
        done += 1
    ed.commit()
    return done


def _from_dq(ed: GraphEditor, tensor: str) -> bool:
    p = ed.producer.get(tensor)
    return p is not None and p.op_type == "DequantizeLinear"


def residual_add_inputs(model: onnx.ModelProto) -> list[tuple[str, int, str]]:
    """(Add node name, input index, tensor) of each Add's identity input that TensorRT wants
    quantized: an Add of two activations, one produced by a Conv, the other not from a DQ."""
    ed = GraphEditor(model)
    found = []
    for n in model.graph.node:
        if n.op_type != "Add" or len(n.input) != 2 or any(i in ed.inits for i in n.input):
            continue
        prods = [ed.producer.get(i) for i in n.input]
        if any(p is None or p.op_type == "Constant" for p in prods):
            continue
        is_conv = [p.op_type == "Conv" for p in prods]
        from_dq = [p.op_type == "DequantizeLinear" for p in prods]
        if not any(is_conv) or any(from_dq):
            continue
        idx = 0 if all(is_conv) else is_conv.index(False)  # both convs: quantize the shortcut (first)
        found.append((n.name, idx, n.input[idx]))
    return found


def insert_tensor_qdq(model: onnx.ModelProto, scales: dict[str, float], *, rewire_outputs: bool,
                      residuals: list[tuple[str, int, str]] | None = None) -> None:
    """Q/DQ for export-time-observed tensors.

    ``rewire_outputs``: quantize the tensor itself (the producer's output is renamed, Q/DQ
    restores the original name, so every consumer reads the dequantized value: conv outputs).
    ``residuals``: quantize only the given Add inputs (the identity branch)."""
    ed = GraphEditor(model)
    if rewire_outputs:
        for tensor, scale in scales.items():
            prod = ed.producer[tensor]
            raw = ed.unique(f"{tensor}_prequant")
            prod.output[list(prod.output).index(tensor)] = raw
            q, dq, out = ed.qdq(raw, np.float32(scale), TensorProto.INT8, tag=f"{prod.name}_output")
            dq.output[0] = tensor
            ed.insert_after(prod, q)
            ed.insert_after(prod, dq)
    for add_name, idx, tensor in residuals or []:
        add = next(n for n in model.graph.node if n.name == add_name)
        q, dq, out = ed.qdq(tensor, np.float32(scales[tensor]), TensorProto.INT8, tag=f"{add_name}_residual")
        ed.insert_before(add, q)
        ed.insert_before(add, dq)
        add.input[idx] = out
    ed.commit()


def observe_absmax(model: onnx.ModelProto, tensors: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """absmax of each named tensor over ``feeds``, run through ONNX Runtime on this graph."""
    import onnxruntime as ort

    if not tensors:
        return {}
    if not feeds:
        raise ConfigError("export-time observers need at least one recorded UNet call")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in tensors:
        m.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    absmax = dict.fromkeys(tensors, 0.0)
    for feed in feeds:
        for t, v in zip(tensors, sess.run(tensors, feed), strict=True):
            absmax[t] = max(absmax[t], float(np.abs(v).max()))
    return {t: max(a, 1e-8) / 127.0 for t, a in absmax.items()}
