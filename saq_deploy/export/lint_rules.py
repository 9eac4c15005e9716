"""Q/DQ lint rules: the graph index and the per-node checks behind ``saq_deploy.export.lint``.

A tensor is *constant* if it is an initializer or a ``Constant`` output, a *weight* if it reaches a
constant through Q, DQ, Cast and shape-only ops; "from DQ" looks back through the shape-only ops
TensorRT commutes DQ across (Identity, Transpose, Reshape, ...). Only the top-level graph is checked.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx
from onnx import helper, numpy_helper

_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
_INT4 = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
_FLOAT16 = onnx.TensorProto.FLOAT16
_SHAPE_OPS = frozenset({"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
_PASS_OPS = _SHAPE_OPS | {"Cast"}
_GEMMS = frozenset({"MatMul", "Gemm"})
_TRT_OPSETS = (13, 25)
_TRT_BLOCKS = (64, 128)

# What to do, appended to each issue's "what is wrong".
_FIX = {
    "opset-range": "re-export (or raise it in a post-pass); TensorRT: 17-20, 21 for INT4/block_size",
    "zero-point-nonzero": "TensorRT is symmetric-only: recalibrate symmetric or drop the zero point",
    "scale-not-constant": "fold the scale to an initializer",
    "scale-not-positive": "recalibrate or clamp scales to a small positive minimum",
    "act-per-channel": "TensorRT quantizes activations per-tensor only: use a scalar scale",
    "int4-on-non-gemm": "TensorRT runs INT4 only as weight-only MatMul/Gemm: use INT8 (or FP8) here",
    "int4-activation": "TensorRT has no INT4 activations (W4A4): use INT8/FP8 or leave it unquantized",
    "block-size": "re-quantize with a supported block size",
    "unquantized-input": "TensorRT runs it unquantized: add Q/DQ, or keep it FP on purpose",
    "residual-add-unquantized": "TensorRT fuses the Add into the conv only if it is: add Q/DQ to it",
    "residual-conv-output-quantized": "TensorRT fuses the Add into the conv only with the conv output "
                                      "unquantized and Q/DQ on the identity input: export --target tensorrt",
    "dangling-qdq": "every Q needs a DQ after it and every DQ a Q or a constant before it",
    "qdq-pair-mismatch": "use one scale and zero point for both so the pair is an exact fake-quant",
    "conv-not-fused": "ORT CPU then runs DQ + FP32 Conv (slower than FP32): add output Q/DQ for QLinearConv",
    "fp16-on-cpu": "ORT CPU runs FP16 ops through casts: export an FP32-typed graph for CPU",
}


@dataclass(frozen=True)
class LintIssue:
    rule: str  # stable id, e.g. "zero-point-nonzero"
    severity: str  # "error" | "warning"
    node: str  # node name, tensor name or "model"
    message: str  # one line: what is wrong and what to do


def _err(rule: str, node: str, what: str, severity: str = "error") -> LintIssue:
    return LintIssue(rule, severity, node, f"{what}; {_FIX[rule]}")


def _warn(rule: str, node: str, what: str) -> LintIssue:
    return _err(rule, node, what, "warning")


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            dtype = np.float32 if "float" in a.name else np.int64
            return numpy_helper.from_array(np.asarray(helper.get_attribute_value(a), dtype), node.output[0])
    return None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _inp(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


class _Graph:
    """Indexes of one graph: producers, consumers, constants, known element types."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.nodes = list(g.node)
        self.names = [n.name or f"{n.op_type}#{i}" for i, n in enumerate(self.nodes)]
        self.consts: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            self.producer.update((o, n) for o in n.output if o)
            for x in filter(None, n.input):
                self.consumers[x].append(n)
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output:
                t = _constant_tensor(n)
                if t is not None:
                    self.consts[n.output[0]] = t
        self.outputs = {o.name for o in g.output}
        self.types = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.input, *g.output, *g.value_info)}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        self._values: dict[str, np.ndarray] = {}

    def value(self, name: str) -> np.ndarray | None:
        if name not in self.consts:
            return None
        if name not in self._values:
            self._values[name] = numpy_helper.to_array(self.consts[name])
        return self._values[name]

    def elem_type(self, name: str) -> int:
        if name in self.consts:
            return self.consts[name].data_type
        p = self.producer.get(name)
        if p is not None and p.op_type == _Q:
            return self.q_out_type(p)
        return self.types.get(name, 0)

    def q_out_type(self, q: onnx.NodeProto) -> int:
        if _inp(q, 2):
            return self.elem_type(q.input[2])
        return _attr(q, "output_dtype", 0) or onnx.TensorProto.UINT8

    def is_int4(self, node: onnx.NodeProto) -> bool:
        if node.op_type == _Q:
            return self.q_out_type(node) in _INT4
        return any(self.elem_type(x) in _INT4 for x in (_inp(node, 0), _inp(node, 2)) if x)

    def _walk_back(self, name: str, through: frozenset) -> tuple[str, onnx.NodeProto | None]:
        """Follow first inputs back through ``through`` ops to a constant (returned with producer
        None) or to a tensor whose producer is another op (or None: a graph input)."""
        for _ in range(64):
            p = self.producer.get(name)
            if name in self.consts or p is None or p.op_type not in through or not p.input:
                return name, None if name in self.consts else p
            name = p.input[0]
        return name, None

    def is_weight(self, name: str) -> bool:
        return self._walk_back(name, _PASS_OPS | {_Q, _DQ})[0] in self.consts

    def from_dq(self, name: str) -> bool:
        p = self._walk_back(name, _SHAPE_OPS)[1]
        return p is not None and p.op_type == _DQ

    def end_consumers(self, name: str) -> set[str]:
        """Op types of the first non-shape, non-Cast ops that consume ``name``."""
        ops, todo, seen = set(), [name], {name}
        while todo:
            for c in self.consumers.get(todo.pop(), []):
                if c.op_type not in _PASS_OPS:
                    ops.add(c.op_type)
                elif c.output and c.output[0] not in seen:
                    seen.add(c.output[0])
                    todo.append(c.output[0])
        return ops


# Node checks: (graph, node, node name) -> issues.
def _check_opset_node(g: _Graph, n, name: str) -> list[LintIssue]:
    if n.op_type not in (_Q, _DQ) or g.opset is None:
        return []
    out = []
    if g.opset < 21 and (_attr(n, "block_size") is not None or g.is_int4(n)):
        out.append(_err("opset-range", name, f"{n.op_type} uses INT4/UINT4 or block_size, which need opset "
                        f">= 21, at opset {g.opset}"))
    s = g.value(_inp(n, 1))
    if g.opset < 13 and s is not None and s.size > 1:
        out.append(_err("opset-range", name, f"per-channel {n.op_type} at opset {g.opset} (axis needs 13)"))
    return out


def _check_scale(g: _Graph, n, name: str) -> list[LintIssue]:
    if n.op_type not in (_Q, _DQ):
        return []
    scale = _inp(n, 1)
    s = g.value(scale)
    if s is None:
        return [_err("scale-not-constant", name, f"scale {scale!r} of {n.op_type} is not a constant")]
    s = s.astype(np.float64)
    bad = s[~np.isfinite(s) | (s <= 0)].ravel()
    if bad.size:
        return [_err("scale-not-positive", name,
                     f"scale {scale!r} has {bad.size} value(s) <= 0 or non-finite (e.g. {bad[0]})")]
    return []


def _check_zero_point(g: _Graph, n, name: str) -> list[LintIssue]:
    zp = _inp(n, 2) if n.op_type in (_Q, _DQ) else ""
    if not zp:
        return []
    z = g.value(zp)
    if z is None:
        return [_err("zero-point-nonzero", name, f"zero point {zp!r} is not a constant")]
    if np.any(z.astype(np.int64) != 0):
        return [_err("zero-point-nonzero", name, f"zero point {zp!r} is not all zeros")]
    return []


def _check_act_per_channel(g: _Graph, n, name: str) -> list[LintIssue]:
    if n.op_type not in (_Q, _DQ) or g.is_weight(n.input[0]):
        return []
    s = g.value(_inp(n, 1))
    if s is not None and s.size > 1:
        return [_err("act-per-channel", name, f"{n.op_type} of activation {n.input[0]!r}: {s.size} scales")]
    return []


def _check_int4_trt(g: _Graph, n, name: str) -> list[LintIssue]:
    if n.op_type == _Q and g.is_int4(n) and not g.is_weight(n.input[0]):
        return [_err("int4-activation", name, f"QuantizeLinear of activation {n.input[0]!r} to INT4")]
    if n.op_type == _DQ and g.is_int4(n):
        bad = sorted(g.end_consumers(n.output[0]) - _GEMMS)
        if bad:
            return [_err("int4-on-non-gemm", name, f"INT4 DequantizeLinear feeds {', '.join(bad)}")]
    return []


def _check_block(g: _Graph, n, name: str, target: str) -> list[LintIssue]:
    bs = _attr(n, "block_size") if n.op_type in (_Q, _DQ) else None
    if not bs:
        return []
    if target == "tensorrt" and bs not in _TRT_BLOCKS:
        return [_err("block-size", name, f"block_size {bs}: TensorRT blocks INT4 weights by 64 or 128 only")]
    if target == "onnxruntime-cpu" and (bs < 16 or bs & (bs - 1)):
        return [_err("block-size", name, f"block_size {bs}: ORT CPU MatMulNBits needs a power of 2 >= 16")]
    return []


def _check_dangling(g: _Graph, n, name: str) -> list[LintIssue]:
    if n.op_type == _Q:
        out = n.output[0]
        users = g.consumers.get(out, [])
        if not users and out not in g.outputs:
            return [_err("dangling-qdq", name, f"QuantizeLinear output {out!r} is unused")]
        bad = sorted({c.op_type for c in users if c.op_type != _DQ})
        if bad:
            return [_err("dangling-qdq", name, f"QuantizeLinear output {out!r} feeds {', '.join(bad)}")]
    if n.op_type == _DQ:
        x = n.input[0]
        p = g.producer.get(x)
        if x not in g.consts and (p is None or p.op_type != _Q):
            return [_err("dangling-qdq", name,
                         f"DequantizeLinear input {x!r} is neither a constant nor a QuantizeLinear output")]
    return []


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Equal values; a missing (None) zero point equals zeros of any size."""
    a = np.zeros(1) if a is None else a.astype(np.float64).ravel()
    b = np.zeros(1) if b is None else b.astype(np.float64).ravel()
    if a.size != b.size:
        return min(a.size, b.size) == 1 and not a.any() and not b.any()
    return bool(np.array_equal(a, b))


def _check_pair(g: _Graph, n, name: str) -> list[LintIssue]:
    q = g.producer.get(n.input[0]) if n.op_type == _DQ else None
    if q is None or q.op_type != _Q:
        return []
    diffs = []
    qs, ds = g.value(_inp(q, 1)), g.value(_inp(n, 1))
    if qs is not None and ds is not None and not _same(qs, ds):
        diffs.append(f"scales ({q.input[1]!r} vs {n.input[1]!r})")
    zq, zd = _inp(q, 2), _inp(n, 2)
    if (not zq or zq in g.consts) and (not zd or zd in g.consts) and not _same(g.value(zq), g.value(zd)):
        diffs.append(f"zero points ({zq or '(none)'!r} vs {zd or '(none)'!r})")
    if diffs:
        return [_warn("qdq-pair-mismatch", name,
                      f"Q {q.name or q.output[0]!r} -> DQ pair has different {' and '.join(diffs)}")]
    return []


def _check_unquantized(g: _Graph, n, name: str) -> list[LintIssue]:
    missing = []
    if n.op_type in ("Conv", "ConvTranspose", "Gemm"):  # input 2 (bias / C) is never flagged
        missing = [f"{role} {_inp(n, i)!r}" for i, role in ((0, "data"), (1, "weight"))
                   if _inp(n, i) and not g.from_dq(_inp(n, i))]
    elif n.op_type == "MatMul" and len(n.input) == 2 and g.is_weight(n.input[1]):
        missing = [f"{role} {x!r}" for role, x in (("activation", n.input[0]), ("weight", n.input[1]))
                   if not g.from_dq(x)]
    elif n.op_type == "MatMul" and len(n.input) == 2:
        # activation x activation (attention): FP on both sides is a choice (attention_matmul off),
        # one side only is not: TensorRT's INT8 MHA fusion needs Q/DQ on both inputs
        from_dq = [g.from_dq(x) for x in n.input]
        if any(from_dq):
            missing = [f"activation {x!r}" for x, q in zip(n.input, from_dq, strict=True) if not q]
    if not missing:
        return []
    return [_warn("unquantized-input", name, f"{n.op_type} {' and '.join(missing)} not from a DQ node")]


def _conv_behind(g: _Graph, x: str) -> tuple[onnx.NodeProto | None, onnx.NodeProto | None]:
    """(Conv, first Q on the way) behind ``x``, following first inputs through Q, DQ and shape-only
    ops: the real data flow of a residual branch whatever Q/DQ placement the graph uses."""
    q = None
    for _ in range(64):
        p = g.producer.get(x)
        if p is None or x in g.consts or not p.input:
            return None, q
        if p.op_type == "Conv":
            return p, q
        if p.op_type not in _SHAPE_OPS | {_Q, _DQ}:
            return None, q
        q = p if p.op_type == _Q else q
        x = p.input[0]
    return None, q


def _check_residual(g: _Graph, n, name: str) -> list[LintIssue]:
    """TensorRT fuses an Add into the conv that feeds it when the conv output reaches the Add
    unquantized and the other (identity) input comes from a DQ; any other placement of an Add that
    joins a conv branch leaves the Add in FP between two reformats."""
    if n.op_type != "Add" or len(n.input) != 2 or any(g.is_weight(x) for x in n.input):
        return []
    behind = [_conv_behind(g, x) for x in n.input]
    if not any(conv for conv, _ in behind):
        return []
    direct = [conv is not None and q is None for conv, q in behind]
    if any(direct[i] and g.from_dq(n.input[1 - i]) for i in (0, 1)):
        return []
    if any(direct):
        i = direct.index(True)
        return [_warn("residual-add-unquantized", name, f"residual Add of conv output {n.input[i]!r} "
                      f"and identity {n.input[1 - i]!r}, which is not from a DequantizeLinear")]
    i = next(i for i, (conv, _) in enumerate(behind) if conv is not None)
    conv, q = behind[i]
    skip = n.input[1 - i]
    tail = "" if g.from_dq(skip) else f", and identity {skip!r} is not from a DequantizeLinear"
    return [_warn("residual-conv-output-quantized", name,
                  f"residual Add's conv branch {conv.output[0]!r} passes through QuantizeLinear "
                  f"{q.name or q.output[0]!r} (the ONNX Runtime placement){tail}")]


def _check_conv_fused(g: _Graph, n, name: str) -> list[LintIssue]:
    if n.op_type != "Conv" or len(n.input) < 2:
        return []
    if not all((p := g.producer.get(x)) is not None and p.op_type == _DQ for x in n.input[:2]):
        return []
    out = n.output[0]
    users = g.consumers.get(out, [])
    if users and all(c.op_type == _Q for c in users) and out not in g.outputs:
        return []
    return [_warn("conv-not-fused", name,
                  f"Conv with DQ inputs but output {out!r} is not consumed only by a QuantizeLinear")]


_CHECKS = {
    "tensorrt": (_check_opset_node, _check_scale, _check_zero_point, _check_act_per_channel, _check_int4_trt,
                 partial(_check_block, target="tensorrt"), _check_dangling, _check_pair, _check_unquantized,
                 _check_residual),
    "onnxruntime-cpu": (_check_opset_node, _check_scale, partial(_check_block, target="onnxruntime-cpu"),
                        _check_dangling, _check_pair, _check_conv_fused),
}


