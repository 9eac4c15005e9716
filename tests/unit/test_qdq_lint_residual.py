"""Q/DQ lint, residual Adds: the TensorRT rule follows the data flow through Q/DQ and shape ops, so
the ONNX Runtime placement (conv output Q/DQ'd before the Add) is flagged for TensorRT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_qdq_lint import add_init, check, make_clean, node  # the clean TensorRT-style graph and its helpers

from saq_deploy.export.lint import lint_model


def _ort_style(m, skip="x_dq", reshape=False):
    """The ONNX Runtime placement: the conv output goes through Q/DQ (and maybe a Reshape pair)
    before the residual Add, whose other input is ``skip``."""
    conv = node(m, "conv")
    conv.output[0] = "c_pre"
    extra = [helper.make_node("QuantizeLinear", ["c_pre", "sa", "za"], ["c_q"], name="q_c"),
             helper.make_node("DequantizeLinear", ["c_q", "sa", "za"], ["c" if not reshape else "c_dq"],
                              name="dq_c")]
    if reshape:
        add_init(m, numpy_helper.from_array(np.array([1, 4, 64], np.int64), "shape_flat"))
        add_init(m, numpy_helper.from_array(np.array([1, 4, 8, 8], np.int64), "shape_back"))
        extra += [helper.make_node("Reshape", ["c_dq", "shape_flat"], ["c_flat"], name="flat"),
                  helper.make_node("Reshape", ["c_flat", "shape_back"], ["c"], name="back")]
    idx = list(m.graph.node).index(conv) + 1
    for k, n in enumerate(extra):
        m.graph.node.insert(idx + k, n)
    node(m, "add").input[1] = skip
    return check(m)


@pytest.mark.parametrize("skip", ["x", "x_dq"])
@pytest.mark.parametrize("reshape", [False, True])
def test_residual_add_in_ort_placement_flagged_for_tensorrt(skip, reshape):
    m = _ort_style(make_clean(int4=False), skip=skip, reshape=reshape)
    res = [i for i in lint_model(m, "tensorrt") if i.rule.startswith("residual-")]
    assert [(i.rule, i.node) for i in res] == [("residual-conv-output-quantized", "add")]
    assert "'c_pre'" in res[0].message and "QuantizeLinear" in res[0].message
    # the unquantized skip is named too; a quantized one is not blamed
    assert ("'x'" in res[0].message) == (skip == "x")


def test_ort_placement_fails_tensorrt_strict_cli(tmp_path, capsys):
    from saq_deploy.cli.app import main

    path = tmp_path / "ort.onnx"
    onnx.save(_ort_style(make_clean(int4=False), skip="x"), path)
    codes = []
    for strict in ([], ["--strict"]):
        with pytest.raises(SystemExit) as exc:
            main(["lint", str(path), "--target", "tensorrt", *strict])
        codes.append(exc.value.code)
    assert codes == [0, 1]  # a warning: fails only under --strict
    assert "residual-conv-output-quantized add" in capsys.readouterr().out


def test_residual_add_of_non_conv_branches_not_flagged():
    m = _ort_style(make_clean(int4=False), skip="x")
    relu = helper.make_node("Relu", ["x_dq"], ["c_pre"], name="conv")  # same data flow, no conv to fuse into
    node(m, "conv").CopyFrom(relu)
    check(m)
    assert not [i for i in lint_model(m, "tensorrt") if i.rule.startswith("residual-")]
