"""Timestep groups with explicit boundaries and per-group activation bits (deployment.md §7.1): an
odd-width unconditional UNet calibrated W4A4 (minmax) with ``act_timestep_bounds = [990]`` and
``act_group_bits = [4, 8]``, exported for ONNX Runtime as 2 Q/DQ graphs and built as 2 engines.

Oracles: the closed-form group of a timestep (t < 990 -> 0, else 1, clamped), one-line recipe
errors, the graphs' activation zero-point types (INT4 in g0, INT8 in g1) and weight digests, the FP
UNet (the 8-bit group's eps error at t = 999 against the same artifact with that group at 4 bits,
its step rescaled exactly as minmax would have set it), and the fake-quant model per group through
the parity reference (the helpers of test_group_engines.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from saq_deploy.backends import build_engine, load_engine
from saq_deploy.calibrate.artifact import load_artifact
from saq_deploy.calibrate.recipe import Recipe, quant_config_for
from saq_deploy.errors import ConfigError
from saq_deploy.quant.timestep import TimestepGroups, timestep_groups
from tests.helpers import calibrate_tiny_uncond
from tests.integration.test_group_engines import _snr_vs_reference

ORT = "onnxruntime-cpu"
BOUNDS, BITS = [990], [4, 8]


def test_groups_follow_the_bounds_in_closed_form():
    g = TimestepGroups(2, BOUNDS)
    t = torch.tensor([-7.0, 0.0, 500.0, 989.0, 989.99, 990.0, 999.0, 1000.0, 4000.0])
    assert timestep_groups(t, g, 1000).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert timestep_groups(989.0, g, 1000).tolist() == [0] and timestep_groups(990, g, 1000).tolist() == [1]
    three = TimestepGroups(3, [100, 990])
    t = torch.arange(-5, 1005, dtype=torch.float32)
    want = (t >= 100).long() + (t >= 990).long()  # the number of bounds <= t
    assert torch.equal(timestep_groups(t, three, 1000), want)
    assert three.t_ranges(1000) == [[0, 100], [100, 990], [990, 1000]]
    # no bounds: the equal-width rule, unchanged
    assert torch.equal(timestep_groups(t, TimestepGroups(4), 1000), timestep_groups(t, 4, 1000))
    assert torch.equal(timestep_groups(t, 4, 1000), torch.floor(t * 4 / 1000).long().clamp(0, 3))


@pytest.mark.parametrize(("overrides", "words"), [
    ({"quant.act_timestep_bounds": [990, 500]}, "strictly ascending"),
    ({"quant.act_timestep_bounds": [500, 500]}, "strictly ascending"),
    ({"quant.act_timestep_bounds": [0]}, "inside (0, T)"),
    ({"quant.act_timestep_bounds": [-3]}, "inside (0, T)"),
    ({"quant.act_timestep_bounds": [990], "quant.act_timestep_groups": 3}, "act_timestep_groups = 3"),
    ({"quant.act_timestep_bounds": [990], "quant.act_group_bits": [4, 8, 8]}, "one bit width per"),
    ({"quant.act_group_bits": [4, 8]}, "needs 2 or more timestep groups"),
    ({"quant.act_timestep_groups": 3, "quant.act_group_bits": [4, 8]}, "one bit width per"),
    ({"quant.act_timestep_bounds": [990], "quant.act_group_bits": [4, 6]}, "4 or 8"),
    ({"quant.act_timestep_bounds": ["990"]}, "list of integers"),
])
def test_recipe_errors_are_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        Recipe().with_overrides(overrides)
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg


def test_bounds_at_or_past_t_are_refused_and_defaults_keep_the_config():
    r = Recipe().with_overrides({"quant.act_timestep_bounds": [1000]})
    with pytest.raises(ConfigError, match=r"inside \(0, T\).*T = 1000"):
        quant_config_for(r, 1000)
    assert quant_config_for(r, 2000).act.grouping.bounds == (1000,)
    # the options absent: recipe.json and the stored quant config as before (no new keys)
    d = Recipe().to_dict()
    assert "act_timestep_bounds" not in d["quant"] and "act_group_bits" not in d["quant"]
    act = quant_config_for(Recipe(), 1000).to_dict()["act"]
    assert act == {"bits": 8, "timestep_groups": 1, "enabled": True}
    r = Recipe().with_overrides({"quant.bits": "w4a4", "quant.act_timestep_bounds": BOUNDS, "quant.act_group_bits": BITS})
    assert r.quant.groups == 2 and Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    act = quant_config_for(r, 1000).to_dict()["act"]
    assert act == {"bits": 4, "timestep_groups": 2, "enabled": True, "timestep_bounds": BOUNDS, "group_bits": BITS}


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """minmax W4A4, bounds [990], bits [4, 8], exported for ONNX Runtime with a grouped engine."""
    from saq_deploy.export.api import export_artifact

    # per-channel INT4 weights: this UNet's 48-wide Linear inputs fit no INT4 block
    out = calibrate_tiny_uncond(tmp_path_factory.mktemp("groupbits"), "w4a4-t8",
                                {"quant.bits": "w4a4", "quant.weight_block_size": 0,
                                 "quant.act_timestep_bounds": BOUNDS, "quant.act_group_bits": BITS})
    export_artifact(out, (ORT,))
    build_engine(out, "onnxruntime")
    return out


def _act_zero_point_types(model: onnx.ModelProto) -> set[int]:
    return {t.data_type for t in model.graph.initializer if t.name.endswith("_input_zero_point")}


@pytest.mark.slow
def test_export_has_int4_activations_in_g0_int8_in_g1_and_one_weight_digest(art):
    from onnx import TensorProto

    from saq_deploy.export.groups import weight_digest

    m = load_artifact(art).manifest
    assert m["quant_config"]["act"]["timestep_bounds"] == BOUNDS and m["quant_config"]["act"]["group_bits"] == BITS
    d = art / "onnx" / ORT
    sec = json.loads((d / "manifest.json").read_text())["timestep_groups"]
    assert sec["groups"] == 2 and sec["bounds"] == BOUNDS and sec["act_bits"] == BITS
    assert sec["t_ranges"] == [[0, 990], [990, 1000]] and [g["t_range"] for g in sec["graphs"]] == sec["t_ranges"]
    assert [g["act_bits"] for g in sec["graphs"]] == BITS and "990" in sec["assign"]
    g0, g1 = (onnx.load(str(d / g["files"]["model.onnx"]["file"])) for g in sec["graphs"])
    # the main layers run INT4 activations in g0 and none in g1 (the 8-bit-kept layers are INT8 in both)
    assert TensorProto.INT4 in _act_zero_point_types(g0) and TensorProto.INT8 in _act_zero_point_types(g0)
    assert _act_zero_point_types(g1) == {TensorProto.INT8}
    assert weight_digest(g0) == weight_digest(g1) == sec["weights_sha256"] and sec["weights_identical"]
    from saq_deploy.quant.fake_quant import quant_layers

    layers = load_artifact(art).loaded.unet
    inits = [{t.name: onnx.numpy_helper.to_array(t) for t in g.graph.initializer} for g in (g0, g1)]
    mixed = 0
    for name, layer in quant_layers(layers).items():
        aq = layer.act_quant
        if aq is None or not aq.mixed_bits:
            continue
        assert aq.group_bits == (4, 8)
        steps = [float(s) for s in aq.step.detach()]
        assert [float(i[f"{name}_input_scale"]) for i in inits] == steps, name
        assert steps[1] < steps[0]  # the 8-bit group's step is finer
        mixed += 1
    assert mixed >= 10


def _eps_err_at(fq, unet, t: float) -> float:
    from saq_deploy.calibrate.artifact import FakeQuantEpsModel
    from saq_deploy.quant.timestep import TimestepGroups

    qc = fq.manifest["quant_config"]
    eps = FakeQuantEpsModel(unet, TimestepGroups.from_quant_config(qc), qc["num_train_timesteps"])
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    tt = torch.full((8,), t)
    with torch.no_grad():
        ref = fq.fp_unet(x, tt).sample
        got = eps(x, tt, None)
    return float((got - ref).norm() / ref.norm())


@pytest.mark.slow
def test_the_8bit_group_beats_the_same_artifact_at_4bit_near_t(art):
    """Negative control: the same weights and data, group 1 at 4 bits with minmax's 4-bit step of
    the same range (amax / 7 = the 8-bit step x 127 / 7)."""
    import copy

    from saq_deploy.quant.fake_quant import ActQuantizer

    fq = load_artifact(art)
    err8 = _eps_err_at(fq, fq.loaded.unet, 999.0)
    four = copy.deepcopy(fq.loaded.unet)
    changed = 0
    for m in four.modules():
        if isinstance(m, ActQuantizer) and m.mixed_bits:
            with torch.no_grad():
                m.step[1] = m.step[1] * 127 / 7
            m.group_bits = (4, 4)
            changed += 1
    assert changed >= 10
    err4 = _eps_err_at(fq, four, 999.0)
    low8, low4 = _eps_err_at(fq, fq.loaded.unet, 500.0), _eps_err_at(fq, four, 500.0)
    print(f"\nrel. eps error vs FP at t=999: 8-bit group {err8:.4f}, 4-bit {err4:.4f}; t=500: {low8:.4f} / {low4:.4f}")
    assert err8 < 0.7 * err4, (err8, err4)
    assert low8 == low4  # group 0 untouched: the control differs in group 1's bits only


@pytest.mark.slow
def test_grouped_engine_matches_the_fake_quant_model_per_group(art):
    from saq_deploy.export.feeds import Call, record_calls

    fq = load_artifact(art)
    calls = record_calls(fq.eps_model(), fq.loaded, steps=10, n=4, seed=7)
    g = torch.Generator().manual_seed(5)
    calls += [Call(torch.randn(4, 3, 8, 8, generator=g), torch.full((4,), t), None, "manual", 0)
              for t in (999.0, 995.0, 989.0)]
    grp = TimestepGroups(2, BOUNDS)
    group_of = [int(timestep_groups(c.t, grp, 1000)[0]) for c in calls]
    assert set(group_of) == {0, 1}
    eng = load_engine(art / "engine")
    em = eng.manifest["timestep_groups"]
    assert em["bounds"] == BOUNDS and em["act_bits"] == BITS and [e["act_bits"] for e in em["engines"]] == BITS
    assert eng.runner.group_ids(torch.tensor([989.0, 990.0, 0.0, 999.0])).tolist() == [0, 1, 0, 1]
    # a t = 999 call runs on the 8-bit engine: the 4-bit one (group 0's) is far from the fake-quant eps
    from saq_deploy.validate.parity import snr_db

    c = calls[-3]
    want = fq.eps_model()(c.x, c.t, None)
    wrong = eng.runner.runners[0].run({"sample": c.x, "timestep": c.t}, tuple(c.x.shape))
    right = eng.eps_model()(c.x, c.t, None)
    wrong_snr, right_snr = snr_db(want, wrong), snr_db(want, right)
    print(f"\nt=999 vs fake-quant: 8-bit engine {right_snr:.1f} dB, 4-bit engine {wrong_snr:.1f} dB")
    assert right_snr > wrong_snr + 10.0
    eng.close()
    snrs = _snr_vs_reference(art, art / "engine", calls)
    by = [float(np.mean([s for s, k in zip(snrs, group_of, strict=True) if k == gg])) for gg in (0, 1)]
    print(f"\nper-call SNR vs fake-quant (dB): group 0 (A4) {by[0]:.1f}, group 1 (A8) {by[1]:.1f}")
    assert min(snrs) > 20.0 and by[1] > 25.0, (by, snrs)
