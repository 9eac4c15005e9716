"""Precision audit of a TensorRT engine from its engine-inspector JSON (pure Python, no TensorRT).

Input: ``json.loads(engine.create_engine_inspector().get_engine_information(
trt.LayerInformationFormat.JSON))`` of an engine built with ``ProfilingVerbosity.DETAILED``:
``{"Layers": [layer, ...], "Bindings": [name, ...]}``, each layer a dict with ``Name``,
``LayerType`` (the kernel family, e.g. ``CaskConvolution``, ``Reformat``), ``ParameterType`` (the
layer kind, e.g. ``Convolution``, ``Scale``), ``Inputs`` / ``Outputs`` (``Name``, ``Dimensions``,
``Format/Datatype`` such as "Thirty-two wide channel vectorized row major Int8 format."), and for
weighted layers ``Weights`` / ``Bias`` as ``{"Type": "Int8", "Count": n}``. Without DETAILED
verbosity ``Layers`` is a list of names only, and nothing but the count can be audited.

What it reports:
- each layer's precision: INT4 if its weights are INT4 (weight-only: the math runs in FP16),
  otherwise the data type of its first input (a fused Q/DQ convolution reads INT8);
- shares over all layers and over *compute* layers (convolutions, GEMMs, anything with weights);
- weight elements by stored type;
- reformat layers, and which of them convert the data type (FP32<->FP16, INT8<->float);
- Q/DQ that did not fuse: standalone Quantize/Dequantize layers, or Scale layers that turn a float
  tensor into INT8 or back (the TensorRT Engine Explorer's rule).
"""

from __future__ import annotations

import re
from collections import Counter

from saq_deploy.errors import ModelLoadError

AUDIT_FORMAT = "saq-deploy-trt-audit"
AUDIT_VERSION = 1

# A word in a "Format/Datatype" or weight "Type" string -> precision. First matching word wins.
_WORDS = {"int8": "INT8", "int4": "INT4", "fp16": "FP16", "half": "FP16", "bfloat16": "BF16", "bf16": "BF16",
          "fp32": "FP32", "float": "FP32", "fp8": "FP8", "fp4": "FP4", "int32": "INT32", "int64": "INT64",
          "bool": "BOOL", "uint8": "UINT8"}
_INT = {"INT8", "INT4", "FP8", "FP4"}  # quantized types
_COMPUTE_WORDS = ("convolution", "deconvolution", "matrixmultiply", "gemm", "fullyconnected", "matmul")
_QDQ_TYPES = {"quantize", "dequantize", "quantizelinear", "dequantizelinear"}
_SKIP_TYPES = {"signal", "wait"}  # multi-stream bookkeeping, not layers
_PROFILE_SUFFIX = re.compile(r"\[profile +[1-9][0-9]*\]")


def dtype_of(text: str | None) -> str:
    """Precision named by a format string ("Row major linear FP32", "Half", ...); "UNKNOWN" if none."""
    for word in re.findall(r"[A-Za-z0-9]+", text or ""):
        if word.lower() in _WORDS:
            return _WORDS[word.lower()]
    return "UNKNOWN"


def _kind(layer: dict) -> str:
    return str(layer.get("ParameterType") or layer.get("LayerType") or "")


def _io_dtype(layer: dict, key: str) -> str | None:
    tensors = layer.get(key) or []
    return dtype_of(tensors[0].get("Format/Datatype")) if tensors else None


def layer_precision(layer: dict) -> str:
    weights = dtype_of((layer.get("Weights") or {}).get("Type"))
    if weights == "INT4":
        return "INT4"
    first = _io_dtype(layer, "Inputs")
    if first is not None:
        return first
    return weights  # constants and other input-less layers: their stored type


def is_compute(layer: dict) -> bool:
    kinds = f"{layer.get('ParameterType', '')} {layer.get('LayerType', '')}".lower()
    return bool((layer.get("Weights") or {}).get("Count")) or any(w in kinds for w in _COMPUTE_WORDS)


def is_reformat(layer: dict) -> bool:
    return "reformat" in f"{layer.get('ParameterType', '')} {layer.get('LayerType', '')}".lower()


def unfused_qdq_role(layer: dict) -> str | None:
    """"Quantize" / "Dequantize" if the layer is a Q/DQ that did not fuse into a neighbour."""
    kind = _kind(layer).lower()
    src, dst = _io_dtype(layer, "Inputs"), _io_dtype(layer, "Outputs")
    if kind in _QDQ_TYPES:
        return "Dequantize" if kind.startswith("de") else "Quantize"
    if kind == "scale" and src is not None and dst is not None and (src in _INT) != (dst in _INT):
        return "Dequantize" if src in _INT else "Quantize"
    return None


def _shares(counts: Counter, total: int) -> dict[str, dict]:
    return {k: {"count": n, "share": round(n / total, 4) if total else 0.0}
            for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def _layers(info: dict) -> list:
    if not isinstance(info, dict) or not isinstance(info.get("Layers"), list):
        raise ModelLoadError("engine information must be a JSON object with a 'Layers' list "
                             "(engine_inspector.get_engine_information(LayerInformationFormat.JSON))")
    layers = [ly for ly in info["Layers"]
              if not (isinstance(ly, dict) and str(ly.get("LayerType", "")).lower() in _SKIP_TYPES)]
    # An engine with several optimization profiles repeats its layers with a "[profile N]" suffix
    return [ly for ly in layers if not _PROFILE_SUFFIX.search(ly.get("Name", "") if isinstance(ly, dict) else ly)]


def audit_layers(info: dict) -> dict:
    """Precision shares, reformats and unfused Q/DQ of an engine (see the module docstring)."""
    layers = _layers(info)
    base = {"format": AUDIT_FORMAT, "version": AUDIT_VERSION, "layers": len(layers)}
    if layers and not all(isinstance(ly, dict) for ly in layers):
        return {**base, "detailed": False,
                "note": "the engine was built without ProfilingVerbosity.DETAILED: only layer names are known"}
    prec = Counter(layer_precision(ly) for ly in layers)
    compute = [ly for ly in layers if is_compute(ly)]
    weights: Counter = Counter()
    for ly in layers:
        w = ly.get("Weights") or {}
        if w.get("Count"):
            weights[dtype_of(w.get("Type"))] += int(w["Count"])
    reformats = [ly for ly in layers if is_reformat(ly)]
    conversions = [{"name": ly.get("Name", ""), "from": _io_dtype(ly, "Inputs"), "to": _io_dtype(ly, "Outputs")}
                   for ly in reformats if _io_dtype(ly, "Inputs") != _io_dtype(ly, "Outputs")]
    unfused = [{"name": ly.get("Name", ""), "role": role, "type": _kind(ly)}
               for ly in layers if (role := unfused_qdq_role(ly)) is not None]
    return {**base, "detailed": True,
            "layer_precision": _shares(prec, len(layers)),
            "compute_layers": len(compute),
            "compute_precision": _shares(Counter(layer_precision(ly) for ly in compute), len(compute)),
            "weights": {"total": sum(weights.values()), "by_type": _shares(weights, sum(weights.values()))},
            "reformat_layers": len(reformats), "reformat_conversions": conversions,
            "unfused_qdq": unfused, "bindings": list(info.get("Bindings", []))}


def _pct(table: dict) -> str:
    return ", ".join(f"{k} {v['share'] * 100:.1f}% ({v['count']})" for k, v in table.items()) or "-"


def format_audit(audit: dict) -> str:
    """Human-readable summary (what ``saq-deploy inspect`` prints for a TensorRT engine)."""
    lines = [f"layers: {audit['layers']}"]
    if not audit.get("detailed", False):
        return "\n".join([*lines, audit.get("note", "")])
    lines += [f"layer precision: {_pct(audit['layer_precision'])}",
              f"compute layers: {audit['compute_layers']}: {_pct(audit['compute_precision'])}",
              f"weights: {audit['weights']['total']} elements: {_pct(audit['weights']['by_type'])}",
              f"reformat layers: {audit['reformat_layers']} ({len(audit['reformat_conversions'])} convert types)"]
    lines += [f"  {c['from']} -> {c['to']}: {c['name']}" for c in audit["reformat_conversions"]]
    lines.append(f"unfused Q/DQ layers: {len(audit['unfused_qdq'])}")
    lines += [f"  {q['role']}: {q['name']}" for q in audit["unfused_qdq"]]
    return "\n".join(lines)
