"""Export -> engine -> parity gate on the reference model with tiny calibrations.

Oracles: ONNX Runtime runs our Q/DQ graphs; the fake-quant PyTorch model they came from is the
reference (exact for weight-only, statistical with activation rounding flips)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from saq_deploy.backends import EngineEpsModel, build_engine, load_engine
from saq_deploy.calibrate.artifact import load_artifact
from saq_deploy.calibrate.run import calibrate
from saq_deploy.export.api import export_artifact
from saq_deploy.export.lint import lint_model
from saq_deploy.quant.fake_quant import quant_layers, set_quant_enabled
from tests.integration.test_calibrate import tiny

pytestmark = pytest.mark.slow
# minmax needs no reconstruction, so real trajectory data (32 seeds x 10 steps) stays fast; the
# 4-seed/3-step TINY data leaves scales so clipped that flips make engine and torch drift apart
DATA = {"calibration.num_samples": 32, "calibration.steps": 10}


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "w8a8"
    calibrate(tiny(method="minmax", bits="w8a8", **DATA), out)
    export_artifact(out)
    return out


@pytest.fixture(scope="module")
def w4a8(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "w4a8"
    calibrate(tiny(method="minmax", bits="w4a8", **DATA), out)
    export_artifact(out, ("tensorrt", "onnxruntime-cpu"))
    return out


@pytest.fixture(scope="module")
def qlora_w4a8(tmp_path_factory):
    """A (very short) SA-QLoRA fine-tune: merged LoRA weights must reach the exported integer codes."""
    out = tmp_path_factory.mktemp("exp") / "qlora"
    calibrate(tiny(method="sa-qlora", bits="w4a8", **DATA, **{"qlora.epochs": 1, "qlora.mixstep": (2, 3),
                                                              "qlora.batch_size": 4, "qlora.rank": 4}), out)
    export_artifact(out)
    return out


def _inputs(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 1, 16, 16, generator=g), torch.linspace(5.0, 990.0, b),
            torch.tensor([0, 3, 5, 7, 9, 10][:b]))


def _feed(x, t, c):
    return {"sample": x.numpy(), "timestep": t.numpy(), "class_labels": c.numpy()}


def _ort(path, **kw):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # keep activations FP32
    src = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["QDQPropagationTransformer"], **kw)


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_export_structure_w8a8(w8a8):
    q = load_artifact(w8a8)
    n_layers = len(quant_layers(q.loaded.unet))
    for target in ("tensorrt", "onnxruntime-cpu"):
        d = w8a8 / "onnx" / target
        m = json.loads((d / "manifest.json").read_text())
        assert m["calibrated"]["state_sha256"] == q.manifest["state_sha256"]
        assert [i["name"] for i in m["inputs"]] == ["sample", "timestep", "class_labels"]
        assert m["inputs"][1]["shape"] == ["B"]  # 1-D timestep, dynamic batch
        model = onnx.load(str(d / "model.onnx"))
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
        inits = {t.name: t for t in model.graph.initializer}
        dq_w = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) > 1]
        assert len(dq_w) == n_layers == sum(m["qdq"]["weight_formats"].values())
        for n in model.graph.node:  # symmetric: every zero point is 0
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
                assert not numpy_helper.to_array(inits[n.input[2]]).any()
    assert (w8a8 / "onnx" / "tensorrt" / "model.fp16.onnx").exists()


def test_w4a8_int4_blocked_gemm_weights_at_opset_21(w4a8):
    model = onnx.load(str(w4a8 / "onnx" / "tensorrt" / "model.onnx"))
    assert next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx")) == 21
    inits = {t.name: t for t in model.graph.initializer}
    consumers = {i: n for n in model.graph.node for i in n.input}
    int4 = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type == onnx.TensorProto.INT4]
    assert int4, "W4A8 must carry INT4 GEMM weights"
    for n in int4:
        attrs = {a.name: a.i for a in n.attribute}
        assert attrs["block_size"] == 64 and attrs["axis"] == 0
        assert consumers[n.output[0]].op_type in ("MatMul", "Gemm")  # never a conv


def test_own_exports_lint_clean(w8a8, w4a8):
    for art in (w8a8, w4a8):
        trt = lint_model(art / "onnx" / "tensorrt" / "model.onnx", "tensorrt")
        assert not [i for i in trt if i.severity == "error"], trt
        assert not [i for i in trt if i.rule in ("unquantized-input", "residual-add-unquantized", "dangling-qdq")]
        assert not [i for i in lint_model(art / "onnx" / "tensorrt" / "model.fp16.onnx", "tensorrt")
                    if i.severity == "error"]
        cpu = lint_model(art / "onnx" / "onnxruntime-cpu" / "model.onnx", "onnxruntime-cpu")
        assert not [i for i in cpu if i.severity == "error"], cpu
        # only conv_out (its output is the graph output 'eps', kept FP32) may stay unfused
        assert all(i.rule == "conv-not-fused" and "conv_out" in i.node for i in cpu if i.severity == "warning")


@pytest.mark.parametrize("fixture", ["w8a8", "qlora_w4a8"])
def test_weight_only_graph_equals_fake_quant(fixture, request):
    """Weights are integers times scales in both: with activations off, ORT and torch agree exactly
    up to float summation order (catches transposed / mis-scaled weights, and for QLoRA a graph
    carrying the source weights instead of the LoRA-merged codes)."""
    from saq_deploy.export.plan import build_plan
    from saq_deploy.export.qdq import insert_layer_qdq
    from saq_deploy.export.torch_export import export_unet_onnx

    w8a8 = request.getfixturevalue(fixture)
    q = load_artifact(w8a8)
    plan = build_plan(q.loaded.unet)
    for lq in plan:
        lq.act_bits = None
    export_unet_onnx(q.fp_unet, "class", (1, 16, 16), w8a8 / "fp.onnx")
    model = onnx.load(str(w8a8 / "fp.onnx"))
    insert_layer_qdq(model, plan, "tensorrt")
    set_quant_enabled(q.loaded.unet, weights=True, acts=False)
    x, t, c = _inputs()
    ref = q.eps_model()(x, t, c).numpy()
    out = _ort(model.SerializeToString()).run(None, _feed(x, t, c))[0]
    assert np.abs(out - ref).max() < 1e-4


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime-cpu"])
def test_qdq_graph_matches_fake_quant_statistically(w8a8, target):
    q = load_artifact(w8a8)
    x, t, c = _inputs()
    ref = q.eps_model()(x, t, c).numpy()
    fp = q.fp_unet(x, t, class_labels=c).sample.detach().numpy()
    out = _ort(w8a8 / "onnx" / target / "model.onnx").run(None, _feed(x, t, c))[0]
    # the engine sits closer to the fake-quant model than the fake-quant model to FP32
    assert _rel(out, ref) < 0.05 and _rel(out, ref) < _rel(ref, fp)


def test_fp16_variant_runs_and_tracks_fp32_graph(w8a8):
    x, t, c = _inputs()
    d = w8a8 / "onnx" / "tensorrt"
    a = _ort(d / "model.onnx").run(None, _feed(x, t, c))[0]
    b = _ort(d / "model.fp16.onnx").run(None, _feed(x, t, c))[0]
    assert b.dtype == np.float32 and _rel(b, a) < 0.05


def test_engine_build_fuses_and_matches(w8a8, tmp_path):
    out = build_engine(w8a8, "onnxruntime", tmp_path / "engine")
    m = json.loads((out / "manifest.json").read_text())
    assert m["backend"] == "onnxruntime" and m["build"]["providers"] == ["CPUExecutionProvider"]
    assert m["source"]["state_sha256"] == load_artifact(w8a8).manifest["state_sha256"]
    assert m["shapes"]["sample"] == [1, 16, 16] and m["parity"]["min_p10_snr_db"] > 0
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"QLinearConv", "MatMulIntegerToFloat"} <= ops  # ORT fused our CPU placement
    eng = load_engine(out)
    x, t, c = _inputs()
    ref = load_artifact(w8a8).eps_model()(x, t, c)
    got = eng.eps_model()(x, t, c)
    assert got.shape == ref.shape and _rel(got, ref) < 0.05
    # batches above max_batch are split and give the same result
    small = EngineEpsModel(eng.runner, "class", (1, 16, 16), max_batch=4)
    assert torch.allclose(small(x, t, c), got, atol=1e-5)


def test_engine_as_diffusers_unet_in_scheduler_loop(w8a8, tmp_path):
    from diffusers import DDIMScheduler

    from saq_deploy.backends.diffusers_unet import EngineUNet

    eng = load_engine(build_engine(w8a8, "onnxruntime", tmp_path / "engine"))
    unet = EngineUNet(eng)
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1
    fq = load_artifact(w8a8).loaded.unet
    labels = torch.tensor([1, 4, 7])
    results = []
    for model in (unet, fq):
        sched = DDIMScheduler.from_config(eng.meta["scheduler_config"])
        sched.set_timesteps(8)
        x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        for tt in sched.timesteps:
            with torch.no_grad():
                eps = model(x, tt, class_labels=labels).sample
            x = sched.step(eps, tt, x).prev_sample
        results.append(x)
    assert _rel(results[0], results[1]) < 0.05


def _run_cli(args, capsys):
    from saq_deploy.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("fixture", ["w8a8", "w4a8", "qlora_w4a8"])
def test_validate_gate_passes_and_reports(fixture, request, capsys):
    art = request.getfixturevalue(fixture)
    build_engine(art, "onnxruntime")
    code, out, err = _run_cli(["validate", str(art), "-n", "8", "--quality-n", "40" if fixture == "w8a8" else "0"],
                              capsys)
    assert code == 0, out + err
    assert "parity PASSED" in out
    gate = json.loads((art / "engine" / "parity.json").read_text())
    assert gate["passed"] and gate["engine_files"] == json.loads((art / "engine" / "manifest.json").read_text())["files"]
    rep = art / "validation" / "onnxruntime"
    assert (rep / "direction-error.png").stat().st_size > 10_000
    text = (rep / "report.md").read_text()
    assert "PASSED" in text and "direction-error.png" in text
    if fixture == "w8a8":
        assert "digit-FID" in out and "## Quality" in text


def test_gate_catches_a_wrong_scale(w8a8, tmp_path, capsys):
    """Negative control: the weight scales of one down block off by 2x (an INT8 scale divided by
    63.5 instead of 127) must fail the gate, and then no quality figures are reported."""
    model = onnx.load(str(w8a8 / "onnx" / "onnxruntime-cpu" / "model.onnx"))
    hit = 0
    for t in model.graph.initializer:
        if t.name.startswith("down_blocks.1.") and t.name.endswith("weight_scale"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 2.0, t.name))
            hit += 1
    assert hit >= 4
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    eng = build_engine(w8a8, "onnxruntime", tmp_path / "bad-engine", onnx_file=bad)
    code, out, err = _run_cli(["validate", str(w8a8), "--engine", str(eng), "-n", "8",
                               "-o", str(tmp_path / "rep")], capsys)
    assert code == 1 and "parity FAILED" in out and "no quality figures" in err, out + err
    assert not json.loads((eng / "parity.json").read_text())["passed"]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "FAILED" in text and "## Quality" not in text
    # the failed gate also measures the model's own float32-vs-float64 floor: far above this engine
    floor = json.loads((tmp_path / "rep" / "result.json").read_text())["numerical_floor"]
    assert floor["measured"] and not floor["at_floor"], floor
    assert floor["mean_snr_db"] > json.loads((eng / "parity.json").read_text())["metrics"]["mean_snr_db"] + 10
    assert "real mismatch" in err and "## Numerical floor" in text


def test_sample_through_engine_cli(w8a8, tmp_path, capsys):
    eng = build_engine(w8a8, "onnxruntime", tmp_path / "engine")
    png = tmp_path / "grid.png"
    code, _out, _ = _run_cli(["sample", "--engine", str(eng), "-n", "10", "--steps", "4", "-o", str(png)], capsys)
    assert code == 0 and png.stat().st_size > 500
    meta = json.loads(png.with_suffix(".json").read_text())
    assert meta["calibrated_artifact"]["backend"] == "onnxruntime"


def test_w4a4_exports_onnxruntime_only(tmp_path, capsys):
    """4-bit activations are no TensorRT mode: an explicit tensorrt target is refused with one line and
    no folder; the default exports what can be deployed and says what it skipped."""
    art = tmp_path / "w4a4"
    calibrate(tiny(method="minmax", bits="w4a4"), art)
    code, _out, err = _run_cli(["export", str(art), "--target", "tensorrt"], capsys)
    assert code == 1 and "TensorRT cannot run" in err and "--target onnxruntime-cpu" in err
    assert not (art / "onnx" / "tensorrt").exists()
    code, _out, err = _run_cli(["export", str(art)], capsys)
    assert code == 0, err
    assert "onnxruntime-cpu placement only" in err
    assert sorted(p.name for p in (art / "onnx").iterdir() if not p.name.startswith(".")) == ["onnxruntime-cpu"]
    assert not [i for i in lint_model(art / "onnx" / "onnxruntime-cpu" / "model.onnx", "onnxruntime-cpu")
                if i.severity == "error"]
