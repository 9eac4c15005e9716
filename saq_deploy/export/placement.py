"""What an exported Q/DQ graph quantizes beyond the calibrated model's layer inputs and weights.

Read back from the graph itself (the very file an engine was built from), not from a manifest:

- *output quantization*: a ``QuantizeLinear`` reading a quantized layer's output, where that Q is
  the output's only reader (every consumer sees the dequantized value). ONNX Runtime's placement
  does this after every conv (QLinearConv fusion); TensorRT's residual Q on a ``conv_shortcut``
  output (whose only reader is the Add) is the same thing. The fake-quant model reproduces these
  with ``saq_deploy.quant.output_quant.output_fake_quant``.
- *integer biases*: a conv bias behind a ``DequantizeLinear`` of INT32 codes (ONNX Runtime's
  placement writes them: QLinearConv adds an INT32 bias), read back as the FP32 values it stands for.
- anything else quantized at export time (TensorRT's residual Q on an Add input that is not a
  conv output, e.g. a resnet block's own input) cannot be a module hook: counted, not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from saq_deploy.export.graph import GraphEditor
from saq_deploy.export.torch_export import module_scope

_WEIGHTED = ("Conv", "Gemm", "MatMul")
_WITH_BIAS = ("Conv", "Gemm")  # ops whose output is the whole module output (a MatMul is followed by its bias Add)


@dataclass
class Placement:
    output_scales: dict[str, float] = field(default_factory=dict)  # module name -> output scale
    biases: dict[str, np.ndarray] = field(default_factory=dict)  # module name -> dequantized INT32 bias
    not_modelled: list[str] = field(default_factory=list)  # tensors quantized but not module outputs


def _scalar(ed: GraphEditor, name: str) -> float | None:
    if name not in ed.inits:
        return None
    arr = numpy_helper.to_array(ed.inits[name])
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def read_placement(model: onnx.ModelProto) -> Placement:
    """The export-time quantization of ``model`` (an exported Q/DQ graph, FP32-typed)."""
    ed = GraphEditor(model)
    out = Placement()
    for n in model.graph.node:
        if n.op_type in _WITH_BIAS and len(n.input) > 2 and module_scope(n.name) is not None:
            dq = ed.producer.get(n.input[2])
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in ed.inits:
                codes = ed.init_array(dq.input[0])
                if codes.dtype == np.int32:
                    zp = ed.init_array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else 0
                    scale = ed.init_array(dq.input[1]).astype(np.float32)
                    out.biases[module_scope(n.name)] = ((codes - zp).astype(np.float32) * scale).astype(np.float32)
    for q in model.graph.node:
        if q.op_type != "QuantizeLinear":
            continue
        src = q.input[0]
        if src in ed.inits:  # a constant (weights are stored as integers: none expected)
            continue
        dqs = [n for n in ed.consumers.get(q.output[0], []) if n.op_type == "DequantizeLinear"]
        readers = {n.op_type for dq in dqs for n in ed.consumers.get(dq.output[0], [])}
        if readers and readers <= set(_WEIGHTED):
            continue  # a calibrated layer or attention matmul input: the fake-quant model has it already
        prod = ed.producer.get(src)
        scope = module_scope(prod.name) if prod is not None and prod.op_type in _WITH_BIAS else None
        only_reader = [n.name for n in ed.consumers.get(src, [])] == [q.name]
        scale = _scalar(ed, q.input[1])
        if scope is not None and only_reader and scale is not None:
            out.output_scales[scope] = scale
        else:
            out.not_modelled.append(src)
    return out
