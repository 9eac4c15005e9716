"""SDXL-class added conditioning (``addition_embed_type="text_time"``) through every stage on a tiny
SDXL-config UNet2DConditionModel (widths 32/64, cross_attention_dim 32, pooled width 16): an
embeddings file with ``pooled`` / ``uncond_pooled`` -> calibration data and methods -> ONNX with
``text_embeds`` / ``time_ids`` inputs -> ONNX Runtime engine -> parity gate -> sampling.

Oracles: diffusers' UNet called directly with ``added_cond_kwargs`` (CFG arithmetic by hand) for
the recorded eps and the FP ONNX graph under ONNX Runtime; the FP UNet for the calibrated model's
agreement; the fake-quant model for the engine."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from saq_deploy.backends.trt_profile import BuildProfile, resolve_shapes
from saq_deploy.calibrate.artifact import load_artifact
from saq_deploy.calibrate.recipe import Recipe
from saq_deploy.calibrate.run import calibrate
from saq_deploy.cli.app import main
from saq_deploy.errors import ConfigError
from saq_deploy.models.eps_model import AddedCond
from tests.helpers import LDM_SCHEDULE, save_unet_folder, tiny_sdxl_unet, train_briefly

pytestmark = pytest.mark.slow
P, L, D, E = 3, 5, 32, 16  # prompts, tokens, cross_attention_dim, pooled width
TIME_IDS = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])  # 8x8 latents x SDXL's VAE factor 8
TINY = {"calibration.num_samples": 16, "calibration.steps": 10, "reconstruction.iters": 4,
        "reconstruction.max_inputs": 32, "reconstruction.batch_size": 8}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """Briefly trained on its prompts (random weights amplify any error along a trajectory: the
    parity gate's final-sample PSNR would mean nothing)."""
    from diffusers import DDPMScheduler

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sdxl")
    g = torch.Generator().manual_seed(1)
    emb = {"cond": torch.randn(P, L, D, generator=g), "uncond": torch.randn(1, L, D, generator=g),
           "pooled": torch.randn(P, E, generator=g), "uncond_pooled": torch.randn(1, E, generator=g)}
    unet = tiny_sdxl_unet()
    added = AddedCond.of(unet.config)
    table = added.pack(torch.cat([emb["cond"], emb["uncond"]]), torch.cat([emb["pooled"], emb["uncond_pooled"]]),
                       TIME_IDS.expand(P + 1, -1))
    model = save_unet_folder(root / "unet", train_briefly(unet, steps=80, cond_table=table), scheduler=False)
    DDPMScheduler(num_train_timesteps=1000, **LDM_SCHEDULE).save_pretrained(model)
    save_file(emb, str(root / "emb.safetensors"))
    return model, root / "emb.safetensors", emb


def _recipe(sdxl, method: str, **extra) -> Recipe:
    model, emb, _ = sdxl
    return Recipe().with_overrides({**TINY, "model.spec": str(model), "calibration.method": method,
                                    "prompts.embeddings_file": str(emb), **extra})


def _unet_eps(unet, x, t, emb, rows, time_ids=TIME_IDS):
    """diffusers' own call for prompt rows (``P`` = the negative prompt)."""
    cond, pooled = torch.cat([emb["cond"], emb["uncond"]]), torch.cat([emb["pooled"], emb["uncond_pooled"]])
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond[rows], return_dict=False, added_cond_kwargs={
            "text_embeds": pooled[rows], "time_ids": time_ids.expand(len(rows), -1)})[0]


def test_brecq_data_carry_the_pooled_embeddings_and_time_ids(sdxl, tmp_path):
    from saq_deploy.calibrate.dataset import TrajectoryDataset
    from saq_deploy.generate import initial_noise
    from saq_deploy.models.loading import load_model

    recipe = _recipe(sdxl, "brecq", **{"calibration.num_samples": 4, "calibration.steps": 3,
                                       "calibration.sampler": "ddim"})
    assert calibrate(recipe, tmp_path / "a", max_blocks=1) == tmp_path / ".a.partial"
    ds = TrajectoryDataset(tmp_path / ".a.partial" / "data")
    rec = ds.load_fields(["x_outer", "t_outer", "label", "step", "sample", "eps_outer"])
    first = rec["step"] == 0
    unet, emb = load_model(recipe.model.spec).unet, sdxl[2]
    x = initial_noise((4, 8, 8), 4, recipe.calibration.seed)[rec["sample"][first]]
    t, rows = rec["t_outer"][first].float(), rec["label"][first].long()
    e_c, e_u = _unet_eps(unet, x, t, emb, rows), _unet_eps(unet, x, t, emb, torch.full_like(rows, P))
    want = e_u + recipe.calibration.cfg * (e_c - e_u)
    assert torch.allclose(rec["eps_outer"][first], want, atol=1e-5)
    other = _unet_eps(unet, x, t, emb, rows, TIME_IDS * 2) - _unet_eps(unet, x, t, emb, rows)
    assert float(other.abs().max()) > 1e-3  # the time ids are an input that matters

    out = calibrate(recipe, tmp_path / "a")  # resume to the end
    q = load_artifact(out)
    assert q.manifest["prompts"]["pooled"] == E and q.manifest["prompts"]["length"] == L
    assert "mid_block.attentions.0" in {b["block"] for b in q.manifest["block_losses"]}
    cond, null = q.prompt_cond(3)
    assert cond.shape == (3, L + 1, D) and null.shape == (1, L + 1, D)  # one packed row: 16 + 6 <= 32
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([900.0, 400.0, 20.0])
    ef = _unet_eps(q.fp_unet, x, t, emb, torch.arange(3))
    eq = q.eps_model()(x, t, cond)
    cos = float(torch.nn.functional.cosine_similarity(eq.flatten(), ef.flatten(), dim=0))
    assert 0.9 < cos < 1.0  # quantized, and still the same model


def test_export_engine_parity_gate_and_sampling(sdxl, tmp_path):
    import onnx
    import onnxruntime as ort

    from saq_deploy.backends import build_engine, load_engine
    from saq_deploy.backends.diffusers_unet import EngineUNet
    from saq_deploy.export.api import export_artifact
    from saq_deploy.export.torch_export import export_unet_onnx
    from saq_deploy.generate import SampleSettings, generate
    from saq_deploy.validate.run import validate_engine

    emb = sdxl[2]
    art = calibrate(_recipe(sdxl, "minmax"), tmp_path / "art")
    export_artifact(art, ("onnxruntime-cpu", "tensorrt"))
    for target in ("onnxruntime-cpu", "tensorrt"):
        graph = onnx.load(str(art / "onnx" / target / "model.onnx"), load_external_data=False)
        inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
        assert inputs == {"sample": ["B", 4, 8, 8], "timestep": ["B"], "encoder_hidden_states": ["B", L, D],
                          "text_embeds": ["B", E], "time_ids": ["B", 6]}
    # a TensorRT profile with the added inputs' shapes resolves against the export's own input list
    specs = json.loads((art / "onnx" / "tensorrt" / "manifest.json").read_text())["inputs"]
    profile = BuildProfile(encoder_hidden_states=(L, D), text_embeds=(E,), time_ids=(6,))
    shapes = resolve_shapes(profile, specs, {"sample_shape": [4, 8, 8]})
    assert shapes["text_embeds"]["max"] == [32, E] and shapes["time_ids"]["min"] == [2, 6]

    # the FP graph under ONNX Runtime against diffusers' call, at a batch the export never saw
    q = load_artifact(art)
    export_unet_onnx(q.fp_unet, "text", (4, 8, 8), tmp_path / "fp.onnx", cond_shape=(L + 1, D))
    x, t, rows = torch.randn(3, 4, 8, 8), torch.tensor([900.0, 400.0, 20.0]), torch.tensor([0, 2, P])
    sess = ort.InferenceSession(str(tmp_path / "fp.onnx"), providers=["CPUExecutionProvider"])
    pooled = torch.cat([emb["pooled"], emb["uncond_pooled"]])
    feed = {"sample": x.numpy(), "timestep": t.numpy(),
            "encoder_hidden_states": torch.cat([emb["cond"], emb["uncond"]])[rows].numpy(),
            "text_embeds": pooled[rows].numpy(), "time_ids": TIME_IDS.expand(3, -1).numpy()}
    got = sess.run(None, feed)[0]
    assert torch.allclose(torch.from_numpy(got), _unet_eps(q.fp_unet, x, t, emb, rows), atol=1e-4)

    # the FP16-typed TensorRT graph (sinusoidal time-ids embedding kept FP32) tracks the FP32 one
    feed = {**feed, "time_ids": (TIME_IDS * 16).expand(3, -1).numpy()}  # SDXL's 1024 px sizes
    d = art / "onnx" / "tensorrt"
    g32, g16 = (ort.InferenceSession(str(d / f), providers=["CPUExecutionProvider"]).run(None, feed)[0]
                for f in ("model.onnx", "model.fp16.onnx"))
    assert float(abs(g16 - g32).max()) < 0.05 * float(abs(g32).max())
    m16 = onnx.load(str(d / "model.fp16.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in (*m16.graph.value_info, *m16.graph.input)}
    sines = {n.name: types.get(n.input[0]) for n in m16.graph.node if n.op_type in ("Sin", "Cos")}
    assert {"/unet/add_time_proj/Sin", "/unet/add_time_proj/Cos"} <= set(sines)  # FP16 loses 1024 x freq's phase
    assert set(sines.values()) == {onnx.TensorProto.FLOAT}, sines

    build_engine(art, "onnxruntime")
    res = validate_engine(art, "onnxruntime", n=4, quality_n=0, log=lambda s: None)
    assert res["passed"], (res["failures"], res["metrics"])
    assert res["metrics"]["calls"] == 20 and res["metrics"]["min_cosine"] > 0.999

    engine = load_engine(art / "engine")
    eng = engine.eps_model()
    cond, null = q.prompt_cond(2)
    t2 = torch.tensor([500.0, 500.0])
    a = eng(x[:2], t2, cond)
    assert torch.allclose(a, q.eps_model()(x[:2], t2, cond), atol=0.05 * float(a.abs().max()))
    added = AddedCond.of(q.fp_unet.config)
    states, extra = added.unpack(cond)
    # the packed cond reaches the engine's three inputs by name: the runner fed them separately agrees
    # exactly (a model this small barely reacts to its added conditioning, ~0.005 of eps against
    # ~0.02 of INT8 rounding noise, so engine-vs-fake-quant cannot tell a wrong feed; the FP graph
    # above checked each input's meaning against diffusers)
    for te, ti in ((extra["text_embeds"] * 10, extra["time_ids"]), (extra["text_embeds"], extra["time_ids"] * 2)):
        e = eng(x[:2], t2, added.pack(states, te, ti))
        assert not torch.allclose(a, e, atol=1e-4)
        direct = engine.runner.run({"sample": x[:2], "timestep": t2, "encoder_hidden_states": states,
                                    "text_embeds": te, "time_ids": ti.contiguous()}, (2, 4, 8, 8))
        assert torch.equal(e, direct)
    with pytest.raises(ConfigError, match=r"SDXL-class: cond must be \(2, 5 \+ 1, D\)"):
        eng(x[:2], t2, states)  # plain text states: refused, not unpacked into garbage
    # diffusers' pipeline-style call of the engine as a unet
    b = EngineUNet(engine)(x[:2], t2, encoder_hidden_states=states, added_cond_kwargs=extra).sample
    assert torch.equal(a, b)

    settings = SampleSettings(sampler="ddim", steps=6, cfg=1.5, seed=3, n=2, batch_size=2)
    s_eng, _ = generate(eng, engine.schedule(), engine.sample_shape, settings, null_label=null, cond=cond)
    s_fq, _ = generate(q.eps_model(), q.loaded.schedule(), q.loaded.sample_shape, settings, null_label=null, cond=cond)
    mse = float(((s_eng - s_fq) ** 2).mean())
    assert s_eng.shape == (2, 4, 8, 8) and torch.isfinite(s_eng).all()
    assert mse < 0.01 * float((s_fq ** 2).mean())  # the engine samples what the fake-quant model samples


def test_sdxl_unet_without_pooled_embeddings_is_one_line(sdxl, tmp_path, capsys):
    model, _, emb = sdxl
    plain = tmp_path / "plain.safetensors"
    save_file({"cond": emb["cond"], "uncond": emb["uncond"]}, str(plain))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nspec = "{model}"\n[calibration]\nmethod = "minmax"\nnum_samples = 2\n'
                      f'steps = 2\n[prompts]\nembeddings_file = "{plain}"\n')
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--recipe", str(recipe), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1, err
    assert "addition_embed_type = 'text_time'" in err[0] and "add 'pooled' (P, E) and 'uncond_pooled' (1, E)" in err[0]
    assert "plain.safetensors" in err[0] and not list(tmp_path.glob("*out*"))
    wide = tmp_path / "wide.safetensors"
    save_file({**emb, "pooled": torch.randn(P, E + 1), "uncond_pooled": torch.randn(1, E + 1)}, str(wide))
    with pytest.raises(ConfigError, match=r"pooled embeddings of width E = 17.*takes E = 16"):
        calibrate(_recipe(sdxl, "minmax", **{"prompts.embeddings_file": str(wide)}), tmp_path / "w")


def test_time_ids_from_the_file_and_bad_added_tensors(sdxl, tmp_path):
    from saq_deploy.calibrate.prompts import bind_prompts, load_prompt_table
    from saq_deploy.models.loading import load_model

    model, _, emb = sdxl
    loaded = load_model(model)

    def bound(**tensors):
        f = tmp_path / "e.safetensors"
        save_file({**emb, **tensors}, str(f))
        recipe = _recipe(sdxl, "minmax", **{"prompts.embeddings_file": str(f)})
        return bind_prompts(loaded, load_prompt_table(recipe)).cond_table

    added = AddedCond.of(loaded.unet.config)
    states, extra = added.unpack(bound())
    assert torch.equal(states, torch.cat([emb["cond"], emb["uncond"]]))
    assert torch.equal(extra["text_embeds"], torch.cat([emb["pooled"], emb["uncond_pooled"]]))
    assert torch.equal(extra["time_ids"], TIME_IDS.expand(P + 1, -1))  # the default: 8x8 latents x 8
    per_row = torch.arange(6 * (P + 1), dtype=torch.float32).reshape(P + 1, 6)
    assert torch.equal(added.unpack(bound(time_ids=per_row))[1]["time_ids"], per_row)
    for bad, match in (({"uncond_pooled": torch.randn(1, E + 2)}, r"'uncond_pooled' must be \(1, 16\)"),
                       ({"time_ids": torch.zeros(2, 6)}, r"'time_ids' must have shape \(1, 6\) or \(4, 6\)"),
                       ({"pooled": torch.randn(P + 1, E)}, r"'pooled' must be a float tensor of shape \(3, E\)")):
        with pytest.raises(ConfigError, match=match):
            bound(**bad)


def test_sample_cond_file_carries_pooled_embeddings_and_time_ids(sdxl, tmp_path, capsys):
    """`sample --cond-file` on an SDXL-class UNet: the pooled embeddings and time ids reach the UNet
    (oracle: generate() on diffusers' UNet called with added_cond_kwargs by hand, same seed)."""
    from saq_deploy.generate import SampleSettings, generate
    from saq_deploy.models.loading import load_model
    from saq_deploy.prompt_inputs import prompt_inputs

    model, _, emb = sdxl
    n = 2
    f = tmp_path / "c.safetensors"
    save_file({"cond": emb["cond"][:1], "uncond": emb["uncond"], "pooled": emb["pooled"][:1],
               "uncond_pooled": emb["uncond_pooled"]}, str(f))
    loaded = load_model(str(model))
    got = prompt_inputs(loaded, n, cond_file=f)
    unet = loaded.unet

    def by_hand(x, t, cond):  # cond: row index 0 (prompt) or P (negative), as the oracle's rows
        return _unet_eps(unet, x, t.reshape(-1).expand(x.shape[0]), emb, cond.long())

    s = SampleSettings(sampler="ddim", steps=3, cfg=2.0, n=n)
    ours, _ = generate(loaded.eps_model(), loaded.schedule(), loaded.sample_shape, s, cond=got.cond, null_label=got.null)
    want, _ = generate(by_hand, loaded.schedule(), loaded.sample_shape, s, cond=torch.zeros(n, dtype=torch.long),
                       null_label=P)
    assert torch.allclose(ours, want, atol=1e-4)
    save_file({"cond": emb["cond"][:1], "uncond": emb["uncond"]}, str(tmp_path / "nopool.safetensors"))
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(model), "--cond-file", str(tmp_path / "nopool.safetensors"), "-n", "1",
              "--steps", "1", "-o", str(tmp_path / "g.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "'pooled' (1|n, E)" in err[0], err
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(model), "--prompt", "a", "-n", "1", "--steps", "1", "-o", str(tmp_path / "g.png")])
    assert "SDXL-class" in capsys.readouterr().err
