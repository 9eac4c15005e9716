"""Timestep-group engines: an artifact calibrated with K = 3 activation-step groups (minmax, an
unconditional odd-width UNet) exports K Q/DQ graphs beside the collapsed one, builds K engines per
backend, and runs them behind one runner that picks each row's engine from its timestep.

Oracles: the fake-quant quantizers' own per-group steps (the graphs' scales), the collapsed graph's
weight initializers (the groups' are byte-identical), the fake-quant model itself through the
parity gate's reference (per call SNR: grouped vs collapsed engine), the same rows run one group at
a time (mixed batches), and the manifest hashes (a tampered group file is refused)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from saq_deploy.backends import build_engine, load_engine
from saq_deploy.calibrate.artifact import load_artifact
from saq_deploy.calibrate.recipe import Recipe
from saq_deploy.calibrate.run import calibrate
from saq_deploy.errors import ModelLoadError
from tests.helpers import calibrate_tiny_uncond

pytestmark = pytest.mark.slow
K = 3
ORT = "onnxruntime-cpu"


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """minmax W8A8, 3 timestep groups, exported (both placements, per-group by default), with a
    grouped ONNX Runtime engine in engine/ and the collapsed graph's engine in engine-collapsed/."""
    out = calibrate_tiny_uncond(tmp_path_factory.mktemp("groups"), "w8a8-g3",
                                {"quant.bits": "w8a8", "quant.act_timestep_groups": K})
    from saq_deploy.export.api import export_artifact

    export_artifact(out)
    build_engine(out, "onnxruntime")
    build_engine(out, "onnxruntime", out / "engine-collapsed", onnx_file=out / "onnx" / ORT / "model.onnx")
    return out


def _inits(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_export_writes_one_graph_per_group_with_the_same_weights_and_the_group_steps(art):
    from saq_deploy.export.groups import weight_digest
    from saq_deploy.quant.fake_quant import quant_layers

    layers = quant_layers(load_artifact(art).loaded.unet)
    for target in ("tensorrt", ORT):
        d = art / "onnx" / target
        m = json.loads((d / "manifest.json").read_text())
        sec = m["timestep_groups"]
        assert sec["mode"] == "per-group" and sec["groups"] == K and sec["num_train_timesteps"] == 1000
        assert [g["t_range"] for g in sec["graphs"]] == [[0, 1000 / 3], [1000 / 3, 2000 / 3], [2000 / 3, 1000]]
        files = [g["files"]["model.onnx"]["file"] for g in sec["graphs"]]
        assert files == [f"model.g{g}.onnx" for g in range(K)] and all(f in m["files"] for f in files)
        if target == "tensorrt":
            assert all("model.fp16.onnx" in g["files"] for g in sec["graphs"])
        collapsed = onnx.load(str(d / "model.onnx"))
        graphs = [onnx.load(str(d / f)) for f in files]
        assert {weight_digest(g) for g in graphs} == {weight_digest(collapsed), sec["weights_sha256"]}
        ref, per = _inits(d / "model.onnx"), [_inits(d / f) for f in files]
        weights = [n for n, a in ref.items() if n.endswith("_quantized") and a.dtype == np.int8]
        assert len(weights) >= 20
        for name in weights:  # the integer codes themselves, byte for byte
            assert all(p[name].tobytes() == ref[name].tobytes() for p in per), name
        checked = 0
        for name, layer in layers.items():
            aq = layer.act_quant
            if aq is None or not aq.enabled:
                continue
            steps = aq.step.detach().float()
            got = [float(p[f"{name}_input_scale"]) for p in per]
            assert got == [float(s) for s in steps], name  # group g's calibrated step, exactly
            assert float(ref[f"{name}_input_scale"]) == float(steps.max())  # collapsed: the largest
            checked += 1
        assert checked >= 20
        spread = [float(layers[n].act_quant.step.detach().max() / layers[n].act_quant.step.detach().min()) for n in layers
                  if layers[n].act_quant is not None and layers[n].act_quant.enabled]
        assert max(spread) > 1.2  # the groups' steps really differ


def _snr_vs_reference(art, engine_dir, calls):
    from saq_deploy.validate.parity import snr_db
    from saq_deploy.validate.reference import placement_reference

    fq, eng = load_artifact(art), load_engine(engine_dir)
    fq_eps, en_eps = fq.eps_model(), eng.eps_model()
    with torch.no_grad(), placement_reference(fq, art, eng.manifest, log=lambda s: None):
        out = [snr_db(fq_eps(c.x, c.t, c.cond), en_eps(c.x, c.t, c.cond)) for c in calls]
    eng.close()
    return out


def test_grouped_engine_tracks_the_fake_quant_model_far_better_than_the_collapsed_graph(art):
    from saq_deploy.export.feeds import record_calls
    from saq_deploy.quant.timestep import timestep_groups

    fq = load_artifact(art)
    calls = record_calls(fq.eps_model(), fq.loaded, steps=10, n=4, seed=7)
    ids = {int(timestep_groups(c.t, K, 1000)[0]) for c in calls}
    assert ids == set(range(K))  # every group has calls
    grouped = _snr_vs_reference(art, art / "engine", calls)
    collapsed = _snr_vs_reference(art, art / "engine-collapsed", calls)
    group_of = [int(timestep_groups(c.t, K, 1000)[0]) for c in calls]

    def by_group(snrs):
        return [float(np.mean([s for s, g in zip(snrs, group_of, strict=True) if g == k])) for k in range(K)]

    g_mean, c_mean = float(np.mean(grouped)), float(np.mean(collapsed))
    g_by, c_by = by_group(grouped), by_group(collapsed)
    print(f"\nper-call SNR vs fake-quant (dB): grouped {g_mean:.1f} {[round(v, 1) for v in g_by]}, "
          f"collapsed {c_mean:.1f} {[round(v, 1) for v in c_by]}")
    # group 0 (t < 333) has the smallest steps: the collapsed graph's largest steps cost most there
    assert g_by[0] > c_by[0] + 3.0, (g_by, c_by)
    assert g_mean > c_mean + 1.0 and all(g > c - 0.5 for g, c in zip(g_by, c_by, strict=True)), (g_by, c_by)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """builtin:digits, minmax W8A8 on 32 seeds x 10 steps, 3 timestep groups (the gate's own setting
    in test_export_engine.py), ONNX Runtime placement: grouped engine/ and engine-collapsed/."""
    from saq_deploy.export.api import export_artifact

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("digits") / "w8a8-g3"
    calibrate(Recipe().with_overrides({"calibration.method": "minmax", "quant.bits": "w8a8", "calibration.num_samples": 32,
                                       "calibration.steps": 10, "quant.act_timestep_groups": K}), out)
    export_artifact(out, (ORT,))
    build_engine(out, "onnxruntime")
    build_engine(out, "onnxruntime", out / "engine-collapsed", onnx_file=out / "onnx" / ORT / "model.onnx")
    return out


def test_grouped_engine_passes_the_parity_gate_the_collapsed_one_fails(digits):
    """The gate compares with the fake-quant model, which uses the groups: K engines match it to
    rounding-flip level, the one collapsed graph (largest steps) does not."""
    from saq_deploy.validate.run import validate_engine

    res = validate_engine(digits, "onnxruntime", n=8, quality_n=0, log=lambda s: None)
    assert res["passed"], res["failures"]
    assert res["placement"]["timestep_groups"] == K and res["placement"]["modelled_biases"] >= 20
    col = validate_engine(digits, "onnxruntime", digits / "engine-collapsed", n=8, quality_n=0, log=lambda s: None,
                          out_dir=digits / "validation-collapsed")
    g, c = res["metrics"], col["metrics"]
    print(f"\ndigits gate: grouped mean SNR {g['mean_snr_db']:.1f} / p10 {g['p10_snr_db']:.1f} dB, "
          f"collapsed {c['mean_snr_db']:.1f} / {c['p10_snr_db']:.1f} dB")
    assert not col["passed"] and g["mean_snr_db"] > c["mean_snr_db"] + 2.0 and g["p10_snr_db"] > c["p10_snr_db"] + 4.0


def test_engine_manifest_and_inspect_say_k_groups(art):
    from saq_deploy.backends.grouped import describe_engine
    from saq_deploy.backends.registry import get_backend

    m = json.loads((art / "engine" / "manifest.json").read_text())
    sec = m["timestep_groups"]
    assert sec["groups"] == K and sec["num_train_timesteps"] == 1000 and [e["dir"] for e in sec["engines"]] == ["g0", "g1", "g2"]
    assert set(m["files"]) == {f"g{g}/model.onnx" for g in range(K)} and m["engine_file"] == "g0/model.onnx"
    src = json.loads((art / "onnx" / ORT / "manifest.json").read_text())["timestep_groups"]
    assert sec["weights_sha256"] == src["weights_sha256"] and sec["weights_identical"]
    assert [e["source_sha256"] for e in sec["engines"]] == [g["files"]["model.onnx"]["sha256"] for g in src["graphs"]]
    head, body, data = describe_engine(get_backend("onnxruntime"), art / "engine", m)
    assert head.startswith(f"{K} timestep groups") and len(data["groups"]) == K and "group 2" in body


def test_a_batch_mixing_groups_returns_the_rows_run_separately(art):
    eng = load_engine(art / "engine")
    eps = eng.eps_model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, 8, generator=g)
    t = torch.tensor([900.0, 100.0, 950.0, 500.0, 120.0])  # groups 2, 0, 2, 1, 0
    mixed = eps(x, t)
    alone = torch.cat([eps(x[i:i + 1], t[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
    # and each row really ran on its group's engine: group 0's engine differs on a group-2 row
    own = eng.runner.runners[0].run({"sample": x[:1], "timestep": t[:1]}, (1, 3, 8, 8))
    assert float((own - mixed[:1]).abs().max()) > 1e-4
    eng.close()


def test_openvino_grouped_engine_builds_and_runs(art):
    pytest.importorskip("openvino", reason="the OpenVINO backend needs the 'openvino' extra")
    out = build_engine(art, "openvino")
    m = json.loads((out / "manifest.json").read_text())
    assert m["timestep_groups"]["groups"] == K and set(m["files"]) == {f"g{g}/model.blob" for g in range(K)}
    assert all(e["build"]["placement"] == "tensorrt" for e in m["timestep_groups"]["engines"])
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([50.0, 980.0, 400.0, 700.0])
    ov = load_engine(out)
    got = ov.eps_model()(x, t)
    fq = load_artifact(art).eps_model()(x, t, None)
    rel = float((got - fq).norm() / fq.norm())
    assert rel < 0.1, rel  # the same quantized model (OpenVINO's rounding, the tensorrt placement)
    ov.close()


def test_a_tampered_group_file_is_refused_in_one_line(art, tmp_path):
    eng = tmp_path / "engine"
    shutil.copytree(art / "engine", eng)
    f = eng / "g1" / "model.onnx"
    f.write_bytes(f.read_bytes()[:-16] + b"\0" * 16)
    with pytest.raises(ModelLoadError) as e:
        load_engine(eng)
    msg = str(e.value)
    assert "g1/model.onnx" in msg and "does not match the hash" in msg and "\n" not in msg


def test_collapsed_option_writes_and_builds_one_graph(art, tmp_path):
    from saq_deploy.cli.app import main

    copy = tmp_path / "art"
    shutil.copytree(art, copy, ignore=shutil.ignore_patterns("engine*", "validation"))
    with pytest.raises(SystemExit) as e:
        main(["export", str(copy), "--target", ORT, "--timestep-groups", "collapsed"])
    assert e.value.code == 0
    d = copy / "onnx" / ORT
    m = json.loads((d / "manifest.json").read_text())
    assert m["timestep_groups"]["mode"] == "collapsed" and not m["timestep_groups"]["graphs"]
    assert not list(d.glob("model.g*.onnx")) and set(m["files"]) == {"model.onnx"}
    em = json.loads((build_engine(copy, "onnxruntime") / "manifest.json").read_text())
    assert "timestep_groups" not in em and set(em["files"]) == {"model.onnx"}
