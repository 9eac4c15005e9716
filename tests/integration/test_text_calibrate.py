"""Prompt calibration of a cross-attention UNet2DConditionModel (random weights, cross_attention_dim 12):
a recipe [prompts] embeddings file -> trajectories with the prompt index in the label column ->
observer, reconstruction and QLoRA methods feeding encoder_hidden_states; resume; bad input.

Oracles: diffusers' UNet called directly with the prompt's and the negative prompt's embeddings
(CFG arithmetic by hand) for the recorded eps, the FP UNet for the calibrated model's agreement,
and an uninterrupted run for resume (byte-identical state file)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from saq_deploy.calibrate.artifact import load_artifact
from saq_deploy.calibrate.recipe import Recipe
from saq_deploy.calibrate.run import calibrate
from saq_deploy.cli.app import main
from saq_deploy.errors import ConfigError
from tests.helpers import LDM_SCHEDULE, save_unet_folder, tiny_unet_cond

pytestmark = pytest.mark.slow
TINY = {"calibration.num_samples": 4, "calibration.steps": 3, "reconstruction.iters": 4,
        "reconstruction.max_inputs": 48, "reconstruction.batch_size": 8,
        "qlora.epochs": 1, "qlora.mixstep": (2, 3), "qlora.batch_size": 2, "qlora.rank": 4}
P, L, D = 3, 5, 12  # prompts, tokens, cross_attention_dim of tiny_unet_cond


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("text")
    model = save_unet_folder(root / "unet", tiny_unet_cond(), scheduler=False)
    from diffusers import DDPMScheduler

    # LDM's schedule: random weights under DDPM's linear one sample values in the hundreds (whose
    # activation ranges leave a W8A8 model nothing in common with FP at ordinary inputs)
    DDPMScheduler(num_train_timesteps=1000, **LDM_SCHEDULE).save_pretrained(model)
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(P, L, D, generator=g), torch.randn(1, L, D, generator=g)
    save_file({"cond": cond, "uncond": uncond}, str(root / "emb.safetensors"))
    return model, root / "emb.safetensors", cond, uncond


def _recipe(setup, method: str, **extra) -> Recipe:
    model, emb, _, _ = setup
    return Recipe().with_overrides({**TINY, "model.spec": str(model), "calibration.method": method,
                                    "prompts.embeddings_file": str(emb), **extra})


def _cfg_eps(unet, x, t, cond, uncond, scale):
    with torch.no_grad():
        e_c = unet(x, t, encoder_hidden_states=cond).sample
        e_u = unet(x, t, encoder_hidden_states=uncond.expand_as(cond)).sample
    return e_u + scale * (e_c - e_u)


@pytest.mark.parametrize("method", ["minmax", "brecq", "sa-ptq", "sa-qlora", "qlora-mse"])
def test_methods_calibrate_a_text_unet_on_its_prompts(setup, tmp_path, method):
    out = calibrate(_recipe(setup, method), tmp_path / method)
    q = load_artifact(out)
    m = q.manifest
    assert q.loaded.kind == "text" and m["method"] == method
    assert m["prompts"]["prompts"] == P and m["prompts"]["width"] == D and m["prompts"]["negative"]
    assert len(m["prompts"]["sha256"]) == 64 and len(m["prompts"]["data_sha256"]) == 64
    blocks = [b["block"] for b in m["block_losses"]]
    if method in ("brecq", "sa-ptq"):  # the transformer blocks are reconstruction blocks
        assert {"down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.1"} <= set(blocks)
    else:
        assert not blocks
    cond = setup[2]
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([900.0, 400.0, 20.0])
    eq = q.eps_model()(x, t, cond)
    with torch.no_grad():
        ef = q.fp_unet(x, t, encoder_hidden_states=cond).sample
    cos = float(torch.nn.functional.cosine_similarity(eq.flatten(), ef.flatten(), dim=0))
    assert 0.9 < cos < 1.0  # quantized, and still the same model


def test_data_cycle_the_prompts_with_cfg_on_the_negative_embedding(setup, tmp_path):
    """The stored eps are the FP UNet's CFG eps for each sample's prompt (index in ``label``)."""
    from saq_deploy.calibrate.dataset import TrajectoryDataset
    from saq_deploy.generate import initial_noise
    from saq_deploy.models.loading import load_model

    n = 4
    recipe = _recipe(setup, "brecq", **{"calibration.num_samples": n, "calibration.sampler": "ddim"})
    assert calibrate(recipe, tmp_path / "a", max_blocks=1) == tmp_path / ".a.partial"
    ds = TrajectoryDataset(tmp_path / ".a.partial" / "data")
    _, _, cond, uncond = setup
    assert torch.equal(ds.cond_table(), torch.cat([cond, uncond]))  # stored once, with its hash
    assert ds.manifest["null_label"] == P and ds.manifest["guided"]
    rec = ds.load_fields(["x_outer", "t_outer", "label", "step", "sample", "eps_outer"])
    first = rec["step"] == 0
    assert rec["label"][first].tolist() == [i % P for i in rec["sample"][first].tolist()]  # cycled
    x_T = initial_noise((4, 8, 8), n, recipe.calibration.seed)
    assert torch.equal(rec["x_outer"][first], x_T[rec["sample"][first]])
    unet = load_model(recipe.model.spec).unet
    t = rec["t_outer"][first].float()
    want = _cfg_eps(unet, x_T[rec["sample"][first]], t, cond[rec["label"][first]], uncond, recipe.calibration.cfg)
    assert torch.allclose(rec["eps_outer"][first], want, atol=1e-5)
    plain = _cfg_eps(unet, x_T[rec["sample"][first]], t, cond[rec["label"][first]], uncond, 1.0)
    assert not torch.allclose(rec["eps_outer"][first], plain, atol=1e-3)  # guidance was applied


def test_resume_after_max_blocks_is_byte_identical(setup, tmp_path):
    recipe = _recipe(setup, "sa-ptq")
    full = calibrate(recipe, tmp_path / "full")
    part = tmp_path / "part"
    calibrate(recipe, part, max_blocks=3)  # past the first transformer block
    info = json.loads((tmp_path / ".part.partial" / "ckpt.json").read_text())
    assert not part.exists() and info["blocks_done"] == 3
    assert info["block_losses"][1]["block"] == "down_blocks.0.attentions.0"
    calibrate(recipe, part)
    assert (full / "calibrated.safetensors").read_bytes() == (part / "calibrated.safetensors").read_bytes()
    assert not (tmp_path / ".part.partial").exists()


def test_text_kv_projections_stay_8bit_in_4bit_recipes(setup, tmp_path):
    from saq_deploy.quant.fake_quant import quant_layers

    out = calibrate(_recipe(setup, "minmax", **{"quant.bits": "w4a8", "quant.weight_block_size": 0}), tmp_path / "w4")
    layers = quant_layers(load_artifact(out).loaded.unet)
    kv = [n for n in layers if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert len(kv) == 8  # 4 transformer blocks (down, mid, 2 up)
    assert all(layers[n].layer_spec.weight_bits == 8 for n in kv)
    for name in ("attn2.to_q", "attn1.to_k", "ff.net.2"):
        assert layers[f"down_blocks.0.attentions.0.transformer_blocks.0.{name}"].layer_spec.weight_bits == 4


def test_changed_embeddings_file_is_another_run(setup, tmp_path):
    _, emb, cond, uncond = setup
    other = tmp_path / "emb.safetensors"
    shutil.copy(emb, other)
    recipe = _recipe(setup, "brecq", **{"prompts.embeddings_file": str(other)})
    calibrate(recipe, tmp_path / "x", max_blocks=1)
    save_file({"cond": cond * 2, "uncond": uncond}, str(other))  # same path, other content
    with pytest.raises(ConfigError, match="different recipe"):
        calibrate(recipe, tmp_path / "x")


def _bad_run(tmp_path, capsys, emb_path, model, extra: str = "") -> str:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nspec = "{model}"\n[calibration]\nmethod = "minmax"\nnum_samples = 2\n'
                      f'steps = 2\n[prompts]\nembeddings_file = "{emb_path}"\n{extra}')
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--recipe", str(recipe), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1, err
    assert not out.exists() and not (tmp_path / ".out.partial").exists()
    assert not list(tmp_path.glob(".out*"))  # nothing collected, nothing left
    return err[0]


def test_bad_embeddings_are_one_line_before_any_data(setup, tmp_path, capsys):
    model, _, cond, _ = setup
    wide = tmp_path / "wide.safetensors"
    save_file({"cond": torch.randn(P, L, 16), "uncond": torch.randn(1, L, 16)}, str(wide))
    err = _bad_run(tmp_path, capsys, wide, model)
    assert "width D = 16" in err and "cross_attention_dim is 12" in err, err
    err = _bad_run(tmp_path, capsys, tmp_path / "missing.safetensors", model)
    assert "missing.safetensors" in err and "does not exist" in err, err
    no_neg = tmp_path / "noneg.safetensors"
    save_file({"cond": cond}, str(no_neg))
    err = _bad_run(tmp_path, capsys, no_neg, model)
    assert "uncond" in err and "calibration.cfg = 1" in err, err
    mism = tmp_path / "mism.safetensors"
    save_file({"cond": cond, "uncond": torch.randn(1, L + 1, D)}, str(mism))
    assert "'uncond' must have shape (1, 5, 12)" in _bad_run(tmp_path, capsys, mism, model)


def test_text_unet_without_prompts_and_class_unet_with_prompts_are_refused(setup, tmp_path, monkeypatch):
    from saq_deploy.reference import DIGITS_UNET_DIR

    model, emb, _, _ = setup
    with pytest.raises(ConfigError, match=r"set \[prompts\] embeddings_file"):
        calibrate(Recipe().with_overrides({**TINY, "model.spec": str(model), "calibration.method": "minmax"}),
                  tmp_path / "a")
    with pytest.raises(ConfigError, match="applies to cross-attention UNets"):
        calibrate(Recipe().with_overrides({**TINY, "model.spec": str(DIGITS_UNET_DIR), "calibration.method": "minmax",
                                           "prompts.embeddings_file": str(emb)}), tmp_path / "b")
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # the optional extra is not installed
    with pytest.raises(ConfigError, match=r"needs the 'transformers' package: pip install 'saq-deploy\[text\]'"):
        calibrate(Recipe().with_overrides({**TINY, "model.spec": str(model), "prompts.prompts": ["a bold seven"]}),
                  tmp_path / "c")
    assert not list(tmp_path.iterdir())


def _wider_unet_cond():
    """tiny_unet_cond at widths 24/48 (8/16 is so narrow that one INT8 rounding flip moves a sample
    by ~25 dB, and the gate's final-sample PSNR would measure that, not the engine)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(24, 48), norm_num_groups=8, cross_attention_dim=D,
                                attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture(scope="module")
def trained_text(tmp_path_factory):
    """Briefly trained on its prompts (random weights amplify any error along a trajectory: the
    final-sample PSNR of the parity gate would mean nothing)."""
    from diffusers import DDPMScheduler

    from tests.helpers import train_briefly

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("text_trained")
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(P, L, D, generator=g), torch.randn(1, L, D, generator=g)
    unet = train_briefly(_wider_unet_cond(), cond_table=torch.cat([cond, uncond]))
    model = save_unet_folder(root / "unet", unet, scheduler=False)
    DDPMScheduler(num_train_timesteps=1000, **LDM_SCHEDULE).save_pretrained(model)
    save_file({"cond": cond, "uncond": uncond}, str(root / "emb.safetensors"))
    return model, root / "emb.safetensors", cond, uncond


def test_export_engine_and_parity_gate_on_prompted_trajectories(trained_text, tmp_path):
    import onnx

    from saq_deploy.backends import build_engine, load_engine
    from saq_deploy.export.api import export_artifact
    from saq_deploy.validate.run import validate_engine

    art = calibrate(_recipe(trained_text, "minmax", **{"calibration.num_samples": 16, "calibration.steps": 10}),
                    tmp_path / "art")
    export_artifact(art, ("onnxruntime-cpu",))
    graph = onnx.load(str(art / "onnx" / "onnxruntime-cpu" / "model.onnx"), load_external_data=False)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert inputs["encoder_hidden_states"] == ["B", L, D]  # dynamic batch, the prompts' L and D
    build_engine(art, "onnxruntime")
    res = validate_engine(art, "onnxruntime", n=4, quality_n=0, log=lambda s: None)
    assert res["passed"], (res["failures"], res["metrics"], {k: v for k, v in res["placement"].items() if k != "not_modelled"}, res["placement"]["not_modelled"][:5])
    assert res["metrics"]["calls"] == 20 and res["metrics"]["min_cosine"] > 0.999
    # the engine takes the text states: another prompt changes its output
    _, _, cond, uncond = trained_text
    eng = load_engine(art / "engine").eps_model()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0])
    a, b = eng(x, t, cond[:2]), eng(x, t, uncond.expand(2, -1, -1))
    assert not torch.allclose(a, b, atol=1e-4)
    q = load_artifact(art)
    assert torch.allclose(a, q.eps_model()(x, t, cond[:2]), atol=0.05 * float(a.abs().max()))


def test_compare_ranks_methods_on_the_prompts(setup, tmp_path):
    from saq_deploy.calibrate.compare import CompareSettings, compare_methods

    res = compare_methods(_recipe(setup, "minmax"), tmp_path / "best",
                          CompareSettings(methods=("minmax", "mse"), eval_n=3), note=lambda s: None)
    assert res["winner"] in ("minmax", "mse") and load_artifact(tmp_path / "best").manifest["prompts"]
    assert all(r["fp"]["mean"] > 0 for r in res["rows"])  # quantized candidates differ from FP
