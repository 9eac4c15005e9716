"""Q/DQ lint: does a QDQ ONNX graph build and fuse on TensorRT or ONNX Runtime CPU?

The TensorRT rules follow its Q/DQ placement needs (symmetric, per-tensor activations, INT4 only as
weight-only GEMMs, residual Adds fusable into their conv); the ONNX Runtime CPU rules follow its
QDQ fusions (QLinearConv needs DQ -> Conv -> Q). The rules live in ``lint_rules``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from saq_deploy.errors import ConfigError, ModelLoadError
from saq_deploy.export.lint_rules import _CHECKS, _FLOAT16, _TRT_OPSETS, LintIssue, _err, _Graph, _warn

__all__ = ["TARGETS", "LintIssue", "format_issues", "lint_model", "summary"]

TARGETS = ("tensorrt", "onnxruntime-cpu")


def _load(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"ONNX model {path} does not exist")
    if not path.is_file():
        raise ModelLoadError(f"ONNX model {path} is not a file")
    try:
        m = onnx.load(path, load_external_data=True)
    except Exception as e:  # noqa: BLE001 -- protobuf decode errors, missing external data, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"{path} is not a readable ONNX model: {first}") from None
    if m.ir_version == 0 or not m.HasField("graph"):  # protobuf parses many non-ONNX files "fine"
        raise ModelLoadError(f"{path} is not an ONNX model (no IR version or graph)")
    return m


def _model_issues(g: _Graph, model: onnx.ModelProto, target: str) -> list[LintIssue]:
    if g.opset is None:
        return [_err("opset-range", "model", "no default-domain opset_import")]
    out: list[LintIssue] = []
    if target == "tensorrt":
        lo, hi = _TRT_OPSETS
        if not lo <= g.opset <= hi:
            out.append(_err("opset-range", "model", f"opset {g.opset} outside {lo}..{hi} (per-channel Q/DQ "
                            f"needs 13, TensorRT 11.x parses up to {hi})"))
        elif g.opset > 20:
            out.append(_warn("opset-range", "model", f"opset {g.opset} > 20: TensorRT 10.0-10.14 will not "
                             "parse it (10.15+ and 11.x will)"))
        return out
    if g.opset < 10:
        out.append(_err("opset-range", "model", f"opset {g.opset} < 10: ONNX Runtime Q/DQ needs opset >= 10"))
    for kind, vis in (("input", model.graph.input), ("output", model.graph.output)):
        out += [_warn("fp16-on-cpu", vi.name, f"graph {kind} {vi.name!r} is FLOAT16")
                for vi in vis if vi.type.tensor_type.elem_type == _FLOAT16]
    if fp16 := [t.name for t in model.graph.initializer if t.data_type == _FLOAT16]:
        out.append(_warn("fp16-on-cpu", "model", f"{len(fp16)} FP16 initializers: {', '.join(fp16[:3])}..."))
    return out


def lint_model(model: onnx.ModelProto | str | Path, target: str = "tensorrt") -> list[LintIssue]:
    """Lint a QDQ ONNX model (a ModelProto or a path) for ``target``; issues in graph order.

    Raises ConfigError for an unknown target and ModelLoadError for a missing or non-ONNX file.
    """
    if target not in TARGETS:
        raise ConfigError(f"unknown lint target {target!r}; choose one of {', '.join(TARGETS)}")
    g = _Graph(m := _load(model))
    issues = _model_issues(g, m, target)
    for node, name in zip(g.nodes, g.names):
        for check in _CHECKS[target]:
            issues.extend(check(g, node, name))
    return issues


def format_issues(issues: list[LintIssue]) -> str:
    """One line per issue: ``ERROR rule node: message`` or ``WARN rule node: message``."""
    return "\n".join(f"{'ERROR' if i.severity == 'error' else 'WARN'} {i.rule} {i.node}: {i.message}"
                     for i in issues)


def summary(issues: list[LintIssue]) -> dict:
    """Counts: ``{"errors": n, "warnings": m, "by_rule": {rule: count}}``."""
    sev = Counter(i.severity for i in issues)
    return {"errors": sev["error"], "warnings": sev["warning"],
            "by_rule": dict(sorted(Counter(i.rule for i in issues).items()))}

