"""A prompts file (sample --prompts-file, recipe prompts.prompts_file) is read by one function: the
same checks for both, each error naming the file as the user gave it (option or recipe key)."""

from __future__ import annotations

import re

import pytest

from saq_deploy.calibrate.prompts import read_prompts
from saq_deploy.calibrate.recipe import Recipe
from saq_deploy.errors import ConfigError
from saq_deploy.prompt_inputs import read_prompts_file


@pytest.mark.parametrize("content, words", [(None, "does not exist"), (b"\xff\xfe thin", "is not UTF-8 text"),
                                            (b"\n  \n", "holds no prompts")])
def test_a_bad_prompts_file_is_named_as_the_user_gave_it(tmp_path, content, words):
    f = tmp_path / "p.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^--prompts-file '{re.escape(str(f))}' {words}"):
        read_prompts_file(f)
    with pytest.raises(ConfigError, match=f"^prompts.prompts_file '{re.escape(str(f))}' {words}"):
        read_prompts(Recipe().with_overrides({"prompts.prompts_file": str(f)}))


def test_recipe_prompts_come_first_then_the_files_lines_stripped(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text(" thin three \n\nabc\n", encoding="utf-8")
    r = Recipe().with_overrides({"prompts.prompts": ["a bold seven"], "prompts.prompts_file": str(f)})
    assert read_prompts(r) == ["a bold seven", "thin three", "abc"]
    assert read_prompts_file(f) == ["thin three", "abc"]
