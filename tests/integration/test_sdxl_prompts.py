"""SDXL-class prompts through the pipeline's own two text encoders, for calibrate, sample and serve.

A tiny SDXL pipeline folder is built here (``tests.helpers.tiny_sdxl_pipeline``: CLIPTextModel of
width 12 + CLIPTextModelWithProjection of width 20 = the UNet's cross_attention_dim 32, projection
16 = its text_embeds width; a 2x VAE). Oracle: diffusers' own ``StableDiffusionXLPipeline``
assembled from the same components, its ``encode_prompt`` (states, pooled, negative ones) and
``_get_add_time_ids`` (the default original = target size, crop (0, 0))."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from saq_deploy.cli.app import main
from saq_deploy.models.eps_model import AddedCond
from tests.helpers import SDXL_E, tiny_sdxl_pipeline

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
PROMPTS = ["a cat", "big dog"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


def _diffusers(root, force_zeros: bool = True):
    """diffusers' SDXL pipeline over the folder's components, loaded by diffusers / transformers."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(root / "vae"), unet=UNet2DConditionModel.from_pretrained(root / "unet"),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2"),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
        scheduler=DDPMScheduler.from_pretrained(root / "scheduler"),
        force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)


def _want(pipe, prompts, negative):
    """(states (P + 1, L, D), pooled (P + 1, E), time ids (1, 6)) as diffusers' pipeline makes them."""
    rows, pooled = [], []
    with torch.no_grad():
        for p in prompts:
            s, ns, ps, nps = pipe.encode_prompt(p, negative_prompt=negative, do_classifier_free_guidance=True,
                                                device="cpu")
            rows.append(s)
            pooled.append(ps)
    size = (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return torch.cat([*rows, ns]), torch.cat([*pooled, nps]), time_ids


def _unpacked(loaded, cond):
    states, extra = AddedCond.of(loaded.unet.config).unpack(cond)
    return states, extra["text_embeds"], extra["time_ids"]


def _assert_same(got, want):
    states, pooled, time_ids = got
    assert torch.allclose(states, want[0], atol=1e-5) and torch.allclose(pooled, want[1], atol=1e-5)
    assert torch.equal(time_ids, want[2].expand(len(states), -1))


@pytest.mark.parametrize("force_zeros", [True, False])
def test_prompt_rows_are_diffusers_encode_prompt(folder, tmp_path, force_zeros):
    """sample's (prompt_inputs) and calibration's tables against diffusers, for no negative prompt
    (zeros under force_zeros_for_empty_prompt, else the empty prompt), "" and a real one."""
    from saq_deploy.calibrate.prompts import bind_prompts, load_prompt_table
    from saq_deploy.calibrate.recipe import Recipe
    from saq_deploy.models.loading import load_model
    from saq_deploy.prompt_inputs import prompt_inputs

    root = folder
    if not force_zeros:
        root = tmp_path / "pipe"
        shutil.copytree(folder, root)
        (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                           "force_zeros_for_empty_prompt": False}))
    pipe, loaded = _diffusers(root, force_zeros), load_model(root)
    assert loaded.vae is not None and pipe.vae_scale_factor == 2  # time ids are 16 px, not 8 x 8
    for negative in (None, "", "a thin two"):
        want = _want(pipe, PROMPTS, negative)
        got = prompt_inputs(loaded, 2, prompts=PROMPTS, negative_prompt=negative)
        _assert_same(_unpacked(loaded, torch.cat([got.cond, got.null])), want)
        assert bool(want[0][-1].any()) != (negative is None and force_zeros)  # the zero rule did apply
        if negative == "":  # a recipe's default "" is diffusers' None (TOML has no None)
            continue
        recipe = Recipe().with_overrides({"model.spec": str(root), "prompts.prompts": PROMPTS,
                                          "prompts.negative_prompt": negative or ""})
        table = bind_prompts(loaded, load_prompt_table(recipe)).cond_table
        _assert_same(_unpacked(loaded, table), want)
    assert not torch.allclose(want[0][0], want[0][1])  # different prompts, different rows


def _sample(*args) -> None:
    with pytest.raises(SystemExit) as e:
        main(["sample", *args])
    assert e.value.code in (0, None)


def test_calibrate_sample_and_serve_take_sdxl_prompts(folder, tmp_path, capsys):
    """CLI calibrate with [prompts] -> the stored table is diffusers'; `sample --prompt` draws what
    `sample --cond-file` with diffusers' embeddings draws; the server's prompt request gives the
    images its embedding request with diffusers' packed rows gives."""
    from saq_deploy.models.loading import load_model
    from saq_deploy.serve.model import from_loaded
    from tests.serve.conftest import client_for

    pipe, loaded = _diffusers(folder), load_model(folder)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nspec = "{folder}"\n[calibration]\nmethod = "minmax"\nnum_samples = 2\n'
                      f'steps = 2\n[prompts]\nprompts = {json.dumps(PROMPTS)}\n')
    art = tmp_path / "art"
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--recipe", str(recipe), "-o", str(art)])
    assert e.value.code in (0, None), capsys.readouterr().err
    m = json.loads((art / "manifest.json").read_text())["prompts"]
    assert (m["prompts"], m["pooled"], m["negative"]) == (2, SDXL_E, True)
    want = _want(pipe, PROMPTS, None)
    _assert_same(_unpacked(loaded, load_file(str(art / m["file"]))["table"]), want)

    states, pooled, time_ids = want
    save_file({"cond": states[:1].contiguous(), "uncond": states[2:].contiguous(), "pooled": pooled[:1].contiguous(),
               "uncond_pooled": pooled[2:].contiguous(), "time_ids": time_ids}, str(tmp_path / "c.safetensors"))
    common = ("--artifact", str(art), "--model", str(folder), "-n", "1", "--steps", "2", "--cfg", "3",
              "--sampler", "ddim", "--seed", "5")
    _sample(*common, "--prompt", PROMPTS[0], "-o", str(tmp_path / "p.png"))
    _sample(*common, "--cond-file", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "c.png"))
    assert (tmp_path / "p.png").read_bytes() == (tmp_path / "c.png").read_bytes()
    _sample(*common, "--prompt", PROMPTS[1], "-o", str(tmp_path / "q.png"))
    assert (tmp_path / "q.png").read_bytes() != (tmp_path / "c.png").read_bytes()  # the prompt matters

    added = AddedCond.of(loaded.unet.config)
    rows = added.pack(states, pooled, time_ids.expand(3, -1))
    served = from_loaded(loaded, loaded.eps_model(), artifact_manifest={"calibrated_for": {
        "samplers": ["ddim"], "steps": 2}})
    with client_for(served) as c:
        assert c.get("/v1/model").json()["prompts"]["accepted"] is True
        body = {"steps": 2, "seed": 7, "cfg": 2.0}
        by_text = c.post("/v1/generate", json={**body, "prompt": PROMPTS[1]})
        by_emb = c.post("/v1/generate", json={**body, "embedding": rows[1].tolist(),
                                              "negative_embedding": rows[2].tolist()})
        assert by_text.status_code == by_emb.status_code == 200, (by_text.text, by_emb.text)
        assert by_text.json()["images"] == by_emb.json()["images"]
        other = c.post("/v1/generate", json={**body, "prompt": PROMPTS[1], "negative_prompt": "a thin two"})
        assert other.json()["images"] != by_emb.json()["images"]  # a negative prompt is not the zero row


def test_sdxl_folder_without_text_encoder_2_is_one_line(folder, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("text_encoder_2"))
    out = tmp_path / "g.png"
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(bare), "--prompt", "a cat", "-n", "1", "--steps", "1", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("error:") and "no text_encoder_2/" in err[0] and "--cond-file" in err[0], err
    assert "SDXL-class" in err[0] and not out.exists() and not out.with_suffix(".json").exists()
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nspec = "{bare}"\n[prompts]\nprompts = ["a cat"]\n')
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--recipe", str(recipe), "-o", str(tmp_path / "art")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "no text_encoder_2/" in err[0], err
    assert not list(tmp_path.glob("*art*"))
