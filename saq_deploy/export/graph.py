"""Small helpers over an onnx GraphProto: producer/consumer maps, initializers, node insertion."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphEditor:
    """Collects edits (new initializers, nodes inserted before/after existing ones, input rewires)
    and writes them back in one topologically ordered pass."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self._before: dict[int, list[onnx.NodeProto]] = {}
        self._after: dict[int, list[onnx.NodeProto]] = {}
        self._front: list[onnx.NodeProto] = []
        self._names: set[str] = {n.name for n in self.graph.node} | set(self.inits)

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def add_init(self, base: str, array: np.ndarray, dtype: int | None = None) -> str:
        name = self.unique(base)
        if dtype in (TensorProto.INT4, TensorProto.UINT4):
            t = helper.make_tensor(name, dtype, list(array.shape), array.astype(np.int32).ravel().tolist())
        else:
            t = numpy_helper.from_array(array, name)
        self.graph.initializer.append(t)
        self.inits[name] = t
        return name

    def init_array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def insert_before(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> None:
        self._before.setdefault(id(anchor), []).append(node)

    def insert_after(self, anchor: onnx.NodeProto | None, node: onnx.NodeProto) -> None:
        """After ``anchor``'s position (graph inputs / initializers: anchor None = graph front)."""
        if anchor is None:
            self._front.append(node)
        else:
            self._after.setdefault(id(anchor), []).append(node)

    def qdq(self, tensor: str, scale: np.ndarray, zp_dtype: int, *, axis: int | None = None,
            block_size: int | None = None, tag: str) -> tuple[onnx.NodeProto, onnx.NodeProto, str]:
        """Q -> DQ pair for ``tensor`` (not wired in); returns (Q, DQ, dequantized name)."""
        s = self.add_init(f"{tag}_scale", np.asarray(scale, dtype=np.float32))
        zshape = () if np.ndim(scale) == 0 else np.shape(scale)
        z = self.add_init(f"{tag}_zero_point", np.zeros(zshape, dtype=np.int8),
                          zp_dtype if zp_dtype == TensorProto.INT4 else None)
        q_out, dq_out = self.unique(f"{tag}_quantized"), self.unique(f"{tag}_dequantized")
        attrs = {} if axis is None else {"axis": axis}
        if block_size:
            attrs["block_size"] = block_size
        q = helper.make_node("QuantizeLinear", [tensor, s, z], [q_out], name=self.unique(f"{tag}_Q"), **attrs)
        dq = helper.make_node("DequantizeLinear", [q_out, s, z], [dq_out], name=self.unique(f"{tag}_DQ"), **attrs)
        return q, dq, dq_out

    def dq_weight(self, codes: np.ndarray, scale: np.ndarray, *, int4: bool, axis: int,
                  block_size: int | None, tag: str) -> tuple[onnx.NodeProto, str]:
        """DequantizeLinear over an integer weight initializer (int8, or int4 for blocked GEMMs)."""
        dtype = TensorProto.INT4 if int4 else TensorProto.INT8
        w = self.add_init(f"{tag}_weight_quantized", codes if int4 else codes.astype(np.int8), dtype if int4 else None)
        s = self.add_init(f"{tag}_weight_scale", scale.astype(np.float32))
        z = self.add_init(f"{tag}_weight_zero_point", np.zeros(scale.shape, dtype=np.int8), dtype if int4 else None)
        out = self.unique(f"{tag}_weight_dequantized")
        attrs = {"axis": axis} | ({"block_size": block_size} if block_size else {})
        return helper.make_node("DequantizeLinear", [w, s, z], [out], name=self.unique(f"{tag}_weight_DQ"), **attrs), out

    def commit(self) -> None:
        """Rebuild the node list with the inserted nodes in place; drop unused initializers."""
        nodes = list(self._front)
        for n in self.graph.node:
            nodes.extend(self._before.get(id(n), []))
            nodes.append(n)
            nodes.extend(self._after.get(id(n), []))
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        used = {i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        self.__init__(self.model)


def set_opset(model: onnx.ModelProto, version: int) -> None:
    """Raise the default-domain opset (the ops our UNets use only gained types/attributes up to 21,
    the same post-pass ModelOpt applies to legacy exports)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < version:
            imp.version = version


def opset_of(model: onnx.ModelProto) -> int:
    return next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
