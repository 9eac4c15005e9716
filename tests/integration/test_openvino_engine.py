"""OpenVINO engines (CPU plugin) from the same calibrated Q/DQ ONNX: build -> validate (the same
parity gate against the fake-quant model) on the reference model builtin:digits, output close to the
ONNX Runtime engine's, the eps contract for sample / bench / serve / the diffusers drop-in, and the
bad inputs: OpenVINO missing, a blob from another OpenVINO version or CPU, a graph OpenVINO cannot
compile. Real OpenVINO throughout (the dev extra installs it); nothing of it is mocked."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from saq_deploy.backends import build_engine, load_engine
from saq_deploy.calibrate.artifact import load_artifact
from saq_deploy.errors import BackendUnavailableError, ModelLoadError
from saq_deploy.utils.io import SEAL_KEY, seal_manifest

pytest.importorskip("openvino", reason="the OpenVINO tests need the 'openvino' extra (in 'dev')")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """builtin:digits, minmax W8A8 on 32 seeds x 10 steps (real trajectories: the gate's own setting
    in tests/integration/test_export_engine.py), with an OpenVINO engine in its default folder and an
    ONNX Runtime engine beside it."""
    from tests.helpers import minmax_artifact

    out = minmax_artifact(tmp_path_factory.mktemp("ov") / "w8a8", 32, 10)
    build_engine(out, "openvino")
    build_engine(out, "onnxruntime")
    return out


def _inputs(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 1, 16, 16, generator=g), torch.linspace(5.0, 990.0, b),
            torch.tensor([0, 3, 5, 7, 9, 10][:b]))


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _cli(args, capsys):
    from saq_deploy.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_manifest_says_what_was_compiled_and_what_runs(art):
    import openvino as ov

    d = art / "engine-openvino"
    m = json.loads((d / "manifest.json").read_text())
    assert m["backend"] == "openvino" and m["engine_file"] == "model.blob" and set(m["files"]) == {"model.blob"}
    b = m["build"]
    assert b["openvino"] == ov.get_version() and b["device"] == "CPU" and b["cpu"]["model"]
    assert b["placement"] == m["source"]["export_target"] == "tensorrt"  # the measured choice
    assert b["inference_precision_hint"] == "f32"
    comp = b["precisions"]["compute_layers"]
    if b["int8_codes"] == "unsigned":  # a CPU without VNNI: oneDNN runs u8-weight convs at FP32 (exact)
        assert comp["int8"] >= 40 and comp["int8"] + comp["fp32"] >= 90, comp
    else:
        assert comp["int8"] >= 40 and comp["fp32"] == 0, comp  # every conv / linear runs INT8
    if b["int8_codes"] == "signed":
        assert b["precisions"]["by_type"]["Convolution"].keys() <= {"u8", "i8"}
    assert m["source"]["state_sha256"] == load_artifact(art).manifest["state_sha256"]
    assert m["parity"]["min_p10_snr_db"] > 0 and SEAL_KEY in m  # thresholds travel sealed with the engine


def test_output_close_to_fake_quant_and_to_the_onnxruntime_engine(art):
    x, t, c = _inputs()
    ov_eps = load_engine(art / "engine-openvino").eps_model()(x, t, c)
    ort_eps = load_engine(art / "engine").eps_model()(x, t, c)
    ref = load_artifact(art).eps_model()(x, t, c)
    assert ov_eps.shape == ort_eps.shape == ref.shape and ov_eps.dtype == torch.float32
    assert _rel(ov_eps, ort_eps) < 0.05 and _rel(ov_eps, ref) < 0.05  # measured ~0.012 (rounding flips)
    assert _rel(ov_eps, ref) > 0  # it is not the fake-quant model itself


def test_validate_passes_the_parity_gate_with_the_default_folder(art, capsys):
    code, out, err = _cli(["validate", str(art), "--backend", "openvino", "-n", "8", "--quality-n", "0"], capsys)
    assert code == 0 and "parity PASSED" in out, out + err
    gate = json.loads((art / "engine-openvino" / "parity.json").read_text())
    man = json.loads((art / "engine-openvino" / "manifest.json").read_text())
    assert gate["passed"] and gate["engine_files"] == man["files"]
    assert (art / "validation" / "openvino" / "report.md").exists()


def test_sample_bench_and_serve_run_the_engine(art, tmp_path, capsys):
    png = tmp_path / "grid.png"
    code, out, err = _cli(["sample", "--engine", str(art / "engine-openvino"), "-n", "4", "--steps", "3",
                           "-o", str(png)], capsys)
    assert code == 0 and png.stat().st_size > 200, out + err
    assert json.loads(png.with_suffix(".json").read_text())["calibrated_artifact"]["backend"] == "openvino"
    from saq_deploy.validate.bench import bench_engine

    r = bench_engine(art, "openvino", batch=2, calls=2, warmup=1, others=(art / "engine",))
    assert set(r["median_ms"]) == {"pytorch-fp32", "onnxruntime-fp32", "openvino-engine (w8a8)",
                                   "onnxruntime-engine (engine)"}
    assert r["speedup_vs_onnxruntime_fp32"] > 0
    from saq_deploy.serve import load_served

    served = load_served(art, "openvino")
    assert served.backend == "openvino" and served.info["engine"]["runtime"] == "openvino"
    assert served.info["engine"]["runtime_version"]
    from saq_deploy.serve.model import GenSpec

    spec = GenSpec(sampler="ddim", steps=2, cfg=1.5, spacing=None, x_T=torch.randn(2, 1, 16, 16),
                   cond=torch.tensor([1, 2]))
    imgs = served.run([spec], batch_size=2)
    assert imgs[0].shape == (2, 1, 16, 16) and torch.isfinite(imgs[0]).all()


def test_diffusers_drop_in(art):
    from diffusers import DDIMScheduler

    from saq_deploy.backends.diffusers_unet import EngineUNet

    eng = load_engine(art / "engine-openvino")
    results = []
    for model in (EngineUNet(eng), load_artifact(art).loaded.unet):
        sched = DDIMScheduler.from_config(eng.meta["scheduler_config"])
        sched.set_timesteps(6)
        x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        for tt in sched.timesteps:
            with torch.no_grad():
                x = sched.step(model(x, tt, class_labels=torch.tensor([1, 4, 7])).sample, tt, x).prev_sample
        results.append(x)
    assert _rel(results[0], results[1]) < 0.05
    eng.close()


def _copy_with_build(art, tmp_path, **changes):
    """A copy of the engine whose manifest says it was built elsewhere, re-sealed (as a genuine
    engine from another machine would be)."""
    d = tmp_path / "moved"
    shutil.copytree(art / "engine-openvino", d)
    m = json.loads((d / "manifest.json").read_text())
    m.pop(SEAL_KEY)
    for key, value in changes.items():
        if key == "cpu_model":
            m["build"]["cpu"]["model"] = value
        else:
            m["build"][key] = value
    (d / "manifest.json").write_text(json.dumps(seal_manifest(m)))
    return d


@pytest.mark.parametrize(("change", "what"), [({"openvino": "2025.0.0-1-old"}, "OpenVINO 2025.0.0-1-old"),
                                               ({"cpu_model": "Other CPU 9000"}, "CPU 'Other CPU 9000'")])
def test_blob_from_another_version_or_cpu_is_refused(art, tmp_path, capsys, change, what):
    d = _copy_with_build(art, tmp_path, **change)
    with pytest.raises(ModelLoadError) as e:
        load_engine(d)
    msg = str(e.value)
    assert "\n" not in msg and what in msg and "rebuild" in msg and "--backend openvino" in msg
    code, _, err = _cli(["sample", "--engine", str(d), "-n", "2", "--steps", "2", "-o",
                           str(tmp_path / "g.png")], capsys)
    assert code == 1 and what in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "g.png").exists()


def test_edited_manifest_is_refused_by_its_seal(art, tmp_path):
    d = tmp_path / "edited"
    shutil.copytree(art / "engine-openvino", d)
    m = json.loads((d / "manifest.json").read_text())
    m["build"]["openvino"] = "2025.0.0"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match="was edited"):
        load_engine(d)


def test_openvino_missing_names_the_extra(art, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    out = tmp_path / "e"
    with pytest.raises(BackendUnavailableError) as e:
        build_engine(art, "openvino", out)
    assert "\n" not in str(e.value) and "pip install 'saq-deploy[openvino]'" in str(e.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(BackendUnavailableError, match=r"saq-deploy\[openvino\]"):
        load_engine(art / "engine-openvino")
    code, _, err = _cli(["validate", str(art), "--backend", "openvino", "--quality-n", "0"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "saq-deploy[openvino]" in err


def test_graph_openvino_cannot_compile_leaves_no_folder(art, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["B", 1, 16, 16]),
           helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["B"]),
           helper.make_tensor_value_info("class_labels", TensorProto.INT64, ["B"])]
    eps = helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["B", 1, 16, 16])
    node = helper.make_node("NoSuchOp", ["sample"], ["eps"])
    bad = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(helper.make_graph([node], "g", ins, [eps]),
                                opset_imports=[helper.make_opsetid("", 17)]), str(bad))
    out = tmp_path / "engines" / "e"
    with pytest.raises(ModelLoadError) as e:
        build_engine(art, "openvino", out, onnx_file=bad)
    msg = str(e.value)
    assert "\n" not in msg and "OpenVINO could not compile" in msg and "NoSuchOp" in msg
    assert "Exception from" not in msg  # the plugin's message, not its source locations
    assert list((tmp_path / "engines").iterdir()) == []  # no engine, no temp folder
