"""The text-to-image reference pipeline's data, tokenizer and trainer (builtin:digits-text).

Oracles: transformers' CLIPTokenizer reading the files we write (each prompt word one token, any
other ASCII word falls apart into letters, never into unknown tokens), the ink rule recomputed by
hand, two training runs from one seed, diffusers' StableDiffusionPipeline loading the folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from saq_deploy.reference.data import load_digits_16
from saq_deploy.reference.text_data import (
    ATTRIBUTES,
    DIGIT_WORDS,
    all_prompts,
    attribute_of,
    eval_prompts,
    ink_thresholds,
    prompt_choices,
    write_tokenizer,
)

pytest.importorskip("transformers")


def test_every_prompt_word_is_one_token_and_unknown_words_spell_out(tmp_path):
    tok = write_tokenizer(tmp_path / "tok")
    from transformers import CLIPTokenizer

    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")  # what a pipeline load reads
    for p in all_prompts():
        ids = again(p).input_ids
        assert len(ids) == len(p.replace(",", " ,").split()) + 2, (p, again.convert_ids_to_tokens(ids))
    spelled = again.convert_ids_to_tokens(again("a bold xyz").input_ids)
    assert spelled[1:3] == ["a</w>", "bold</w>"] and spelled[3:-1] == ["x", "y", "z</w>"]
    assert tok.unk_token_id not in again("quick brown fox, 42!").input_ids[1:-1]


def test_attribute_is_the_ink_rule_and_splits_each_class_in_half():
    x, y = load_digits_16()
    th = ink_thresholds(x, y)
    ink = ((x + 1) / 2).flatten(1).mean(1)
    want = torch.tensor([float(ink[i]) > th[int(y[i])] for i in range(len(y))]).long()
    got = attribute_of(x, y, th)
    assert torch.equal(got, want)
    for c in range(10):
        frac = got[y == c].float().mean()
        assert 0.4 < frac < 0.6  # the median splits every class


def test_prompt_choices_name_the_digit_and_attribute():
    prompts = all_prompts()
    with_attr, plain = prompt_choices(7, 1)
    assert all(("seven" in prompts[i] or "7" in prompts[i]) and "bold" in prompts[i] for i in with_attr)
    assert all("bold" not in prompts[i] and "thin" not in prompts[i] for i in plain)
    texts, index, digit, attr = eval_prompts(40)
    assert texts[int(index[13])] == f"a {ATTRIBUTES[1]} {DIGIT_WORDS[3]}" and int(digit[13]) == 3 and int(attr[13]) == 1


def test_training_is_reproducible_and_writes_a_diffusers_pipeline(tmp_path):
    from saq_deploy.reference.text_train import TextTrainConfig, train_text_reference

    cfg = TextTrainConfig(steps=2, batch_size=4, warmup=1)
    a = train_text_reference(tmp_path / "a", cfg, progress=False)
    train_text_reference(tmp_path / "b", cfg, progress=False)
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        wa, wb = load_file(str(tmp_path / "a" / part / name)), load_file(str(tmp_path / "b" / part / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), part
    assert json.loads((tmp_path / "a" / "training_log.json").read_text())["config"]["steps"] == 2
    assert a["parameters"]["text_encoder"] > 0
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a", local_files_only=True, vae=None,
                                                   safety_checker=None, feature_extractor=None,
                                                   image_encoder=None, requires_safety_checker=False)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    from saq_deploy.models.loading import load_model

    m = load_model(str(tmp_path / "a"))
    assert m.kind == "text" and len(m.meta["default_prompts"]) == 20
