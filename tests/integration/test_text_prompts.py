"""Calibration prompts through the pipeline's own tokenizer + text encoder (a tiny CLIP the test
builds: 54-token character vocabulary, 8-token maximum, width 12 = the UNet's cross_attention_dim).

Oracle: transformers' CLIPTokenizer / CLIPTextModel called directly, as diffusers' pipelines call
them (pad to max length, truncate, last hidden state), for the stored embedding rows."""

from __future__ import annotations

import pytest
import torch

from saq_deploy.calibrate.artifact import load_artifact
from saq_deploy.calibrate.recipe import Recipe
from saq_deploy.calibrate.run import calibrate
from saq_deploy.cli.app import main
from tests.helpers import LDM_SCHEDULE, TEXT_MAX_LEN, encode_text, tiny_text_pipeline

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
TINY = {"calibration.num_samples": 3, "calibration.steps": 2, "calibration.method": "minmax"}
MAX_LEN = TEXT_MAX_LEN


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return tiny_text_pipeline(tmp_path_factory.mktemp("sd") / "pipe", schedule=LDM_SCHEDULE)


def _encode(root, texts):
    return encode_text(root, texts)


def test_prompts_are_encoded_by_the_pipelines_text_encoder(pipeline, tmp_path, capsys):
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("thin three\n\nabcdefghijk\n")  # a blank line is skipped; 11 letters > 8 tokens
    r = Recipe().with_overrides({**TINY, "model.spec": str(pipeline), "prompts.prompts": ["a bold seven"],
                                 "prompts.prompts_file": str(pfile), "prompts.negative_prompt": "blurry"})
    out = calibrate(r, tmp_path / "art")
    err = capsys.readouterr().err
    assert "prompt 3 is 13 tokens, longer than the tokenizer's maximum 8: truncated" in err, err
    m = load_artifact(out).manifest["prompts"]
    assert m["prompts"] == 3 and m["negative"] and (m["length"], m["width"]) == (MAX_LEN, 12)
    from safetensors.torch import load_file

    table = load_file(str(out / m["file"]))["table"]
    want = _encode(pipeline, ["a bold seven", "thin three", "abcdefghijk", "blurry"])
    assert torch.allclose(table, want, atol=1e-6)
    assert not torch.allclose(table[0], table[1], atol=1e-3)  # different prompts, different rows


def test_default_negative_prompt_is_the_empty_prompt(pipeline, tmp_path):
    r = Recipe().with_overrides({**TINY, "model.spec": str(pipeline), "prompts.prompts": ["thin three"]})
    from saq_deploy.calibrate.prompts import load_prompt_table

    t = load_prompt_table(r)
    assert t.count == 1 and t.null_index == 1
    assert torch.allclose(t.table, _encode(pipeline, ["thin three", ""]), atol=1e-6)
    assert calibrate(r, tmp_path / "a").is_dir()


def _one_line_error(tmp_path, capsys, recipe_text: str) -> str:
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--recipe", str(recipe), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1, err
    assert not list(tmp_path.glob("*out*"))
    return err[0]


def test_empty_prompts_file_and_missing_text_encoder_are_one_line(pipeline, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    err = _one_line_error(tmp_path, capsys, f'[model]\nspec = "{pipeline}"\n[prompts]\nprompts_file = "{empty}"\n')
    assert "holds no prompts" in err, err
    err = _one_line_error(tmp_path, capsys, f'[model]\nspec = "{pipeline / "unet"}/../../nowhere"\n'
                                            '[prompts]\nprompts = ["a"]\n')
    assert "does not exist" in err, err
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(pipeline, bare, ignore=shutil.ignore_patterns("text_encoder"))
    err = _one_line_error(tmp_path, capsys, f'[model]\nspec = "{bare}"\n[prompts]\nprompts = ["a"]\n')
    assert "no text_encoder/" in err and "embeddings_file" in err, err


def test_sample_and_calibrate_word_the_truncation_warning_alike(pipeline, capsys):
    """`sample --prompt` returns the warnings for its caller to print; calibration's table prints
    them: one wording, from one place, and only the over-long prompt is named."""
    from saq_deploy.models.loading import load_model
    from saq_deploy.models.text_encoder import TextEncoder
    from saq_deploy.prompt_inputs import prompt_inputs

    prompts = ["abc", "abcdefghijk"]  # 5 tokens fit; 13 do not (kept: bos + 6 letters + eos)
    got = prompt_inputs(load_model(str(pipeline)), 2, prompts=prompts)
    assert got.warnings == ["prompt 2 is 13 tokens, longer than the tokenizer's maximum 8: truncated to 'abcdef'"]
    assert capsys.readouterr().err == ""  # not printed here as well: sample prints them once
    TextEncoder(pipeline).table(prompts, "")
    assert capsys.readouterr().err == f"warning: {got.warnings[0]}\n"
