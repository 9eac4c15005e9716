"""TensorRT build profiles: the shipped TOML files, validation errors, shape resolution. No TensorRT."""

from __future__ import annotations

from pathlib import Path

import pytest

from saq_deploy.backends.trt_profile import (
    BuildProfile,
    load_profile,
    profile_from_dict,
    resolve_profile,
    resolve_shapes,
)
from saq_deploy.errors import ConfigError

PROFILES = Path(__file__).resolve().parents[2] / "engines" / "profiles"
CLASS_INPUTS = [{"name": "sample", "dtype": "float32", "shape": ["B", 1, 16, 16]},
                {"name": "timestep", "dtype": "float32", "shape": ["B"]},
                {"name": "class_labels", "dtype": "int64", "shape": ["B"]}]
DIGITS_META = {"sample_shape": [1, 16, 16], "kind": "class"}


def write(tmp_path, text, name="p.toml"):
    f = tmp_path / name
    f.write_text(text)
    return f


def test_digits_profile():
    p = load_profile(PROFILES / "digits.toml")
    assert (p.name, p.min_batch, p.opt_batch, p.max_batch, p.cfg) == ("digits", 1, 16, 64, True)
    assert p.batches == (2, 32, 128)  # CFG runs [uncond; cond] as one engine call
    assert p.precision == "fp16" and p.onnx_file == "model.fp16.onnx"
    assert p.timing_cache == "engines/timing.cache" and not p.version_compatible and not p.cuda_graph
    assert p.sha256 and len(p.sha256) == 64 and p.path.endswith("digits.toml")
    shapes = resolve_shapes(p, CLASS_INPUTS, DIGITS_META)
    assert shapes["sample"] == {"min": [2, 1, 16, 16], "opt": [32, 1, 16, 16], "max": [128, 1, 16, 16]}
    assert shapes["timestep"] == {"min": [2], "opt": [32], "max": [128]}
    assert shapes["class_labels"]["max"] == [128]


def test_sd15_profile_shapes_for_a_text_unet():
    p = load_profile(PROFILES / "sd15_512.toml")
    assert p.sample == (4, 64, 64) and p.encoder_hidden_states == (77, 768)
    assert p.batches == (2, 2, 8)
    inputs = [{"name": "sample", "shape": ["B", 4, 64, 64]}, {"name": "timestep", "shape": ["B"]},
              {"name": "encoder_hidden_states", "shape": ["B", 77, 768]}]
    shapes = resolve_shapes(p, inputs, {"sample_shape": [4, 64, 64]})
    assert shapes["encoder_hidden_states"] == {"min": [2, 77, 768], "opt": [2, 77, 768], "max": [8, 77, 768]}
    # a dynamic sequence length in the export takes the profile's
    inputs[2]["shape"] = ["B", "L", 768]
    assert resolve_shapes(p, inputs, {"sample_shape": [4, 64, 64]})["encoder_hidden_states"]["opt"] == [2, 77, 768]


def test_ldm4_profile():
    p = load_profile(PROFILES / "ldm4_256.toml")
    assert p.sample == (3, 64, 64) and p.batches == (2, 8, 32)
    inputs = [{"name": "sample", "shape": ["B", 3, 64, 64]}, {"name": "timestep", "shape": ["B"]}]
    assert resolve_shapes(p, inputs, {"sample_shape": [3, 64, 64]})["sample"]["max"] == [32, 3, 64, 64]


def test_profile_for_another_model_is_refused():
    p = load_profile(PROFILES / "ldm4_256.toml")
    with pytest.raises(ConfigError, match=r"profile 'ldm4_256' is for sample \[3, 64, 64\].*\[1, 16, 16\]"):
        resolve_shapes(p, CLASS_INPUTS, DIGITS_META)
    with pytest.raises(ConfigError, match="no cross-attention input"):
        resolve_shapes(BuildProfile(encoder_hidden_states=(77, 768)), CLASS_INPUTS, DIGITS_META)


def test_dynamic_dim_without_profile_value():
    inputs = [{"name": "sample", "shape": ["B", 4, 8, 8]}, {"name": "encoder_hidden_states", "shape": ["B", "L", 12]}]
    with pytest.raises(ConfigError, match="set shapes.encoder_hidden_states"):
        resolve_shapes(BuildProfile(), inputs, {"sample_shape": [4, 8, 8]})
    with pytest.raises(ConfigError, match="no dynamic batch"):
        resolve_shapes(BuildProfile(), [{"name": "sample", "shape": [1, 4, 8, 8]}], {"sample_shape": [4, 8, 8]})


def test_defaults_and_cfg_off(tmp_path):
    p = resolve_profile(None)
    assert p == BuildProfile() and p.name == "default" and p.path is None and p.sha256 is None
    q = load_profile(write(tmp_path, "[batch]\nmin = 2\nopt = 3\nmax = 5\ncfg = false\n"))
    assert q.name == "p" and q.batches == (2, 3, 5)
    assert resolve_profile(q) is q
    d = q.to_dict()
    assert d["engine_batches"] == [2, 3, 5] and d["precision"] == "fp16" and d["sample"] is None


def test_name_from_file_is_overridden_by_key(tmp_path):
    assert load_profile(write(tmp_path, 'name = "mine"\n')).name == "mine"


@pytest.mark.parametrize("text, match", [
    ("[batch]\nmin = 4\nopt = 2\nmax = 8\n", r"min <= opt <= max"),
    ("[batch]\nmin = 1\nopt = 9\nmax = 8\n", r"min <= opt <= max"),
    ("[batch]\nmin = 0\n", r"batch.min must be >= 1"),
    ("[batch]\nmax = -3\n", r"batch.max must be >= 1"),
    ("[batch]\nopt = 2.5\n", r"batch.opt must be an integer"),
    ("[batch]\nmin = true\n", r"batch.min must be an integer"),
    ("[batch]\ncfg = 1\n", r"cfg must be true or false"),
    ("[batch]\nbatch = 3\n", r"unknown profile key 'batch.batch'; allowed in \[batch\]: min, opt, max, cfg"),
    ("workspace = 3\n", r"unknown profile key 'workspace'"),
    ("batch = 3\n", r"'batch' must be a table"),
    ('[build]\nprecision = "int8"\n', r"build.precision = 'int8' is not supported; choose one of: fp16, fp32"),
    ("[build]\noptimization_level = 6\n", r"optimization_level must be 0..5, got 6"),
    ("[build]\noptimization_level = -1\n", r"optimization_level must be 0..5"),
    ("[build]\nworkspace_mib = 0\n", r"workspace_mib must be >= 1"),
    ("[build]\ntiming_cache = 3\n", r"timing_cache must be a path string"),
    ('[build]\nversion_compatible = "yes"\n', r"version_compatible must be true or false"),
    ("[shapes]\nsample = [16, 16]\n", r"shapes.sample must be a list of 3 positive integers"),
    ("[shapes]\nsample = [1, 0, 16]\n", r"shapes.sample must be >= 1"),
    ("[runtime]\ncuda_graph = 0\n", r"cuda_graph must be true or false"),
    ('name = "a/b"\n', r"profile name 'a/b' must be"),
])
def test_bad_values(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_profile(write(tmp_path, text))


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_profile(write(tmp_path, "[batch\nmin = 1"))
    with pytest.raises(ConfigError, match="must be a TOML table"):
        profile_from_dict([1, 2])


def test_error_messages_are_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_profile(write(tmp_path, "[batch]\nmin = 4\nopt = 2\n"))
    assert "\n" not in str(e.value)


def test_sdxl_profile_shapes_the_added_conditioning_inputs():
    p = load_profile(PROFILES / "sdxl_1024.toml")
    assert p.sample == (4, 128, 128) and p.encoder_hidden_states == (77, 2048)
    assert p.text_embeds == (1280,) and p.time_ids == (6,) and p.batches == (2, 2, 8)
    inputs = [{"name": "sample", "shape": ["B", 4, 128, 128]}, {"name": "timestep", "shape": ["B"]},
              {"name": "encoder_hidden_states", "shape": ["B", 77, 2048]},
              {"name": "text_embeds", "shape": ["B", 1280]}, {"name": "time_ids", "shape": ["B", 6]}]
    shapes = resolve_shapes(p, inputs, {"sample_shape": [4, 128, 128]})
    assert shapes["text_embeds"] == {"min": [2, 1280], "opt": [2, 1280], "max": [8, 1280]}
    assert shapes["time_ids"] == {"min": [2, 6], "opt": [2, 6], "max": [8, 6]}
    assert p.to_dict()["text_embeds"] == [1280] and p.to_dict()["time_ids"] == [6]
    inputs[3]["shape"] = ["B", 1024]  # another pooled width: another model
    with pytest.raises(ConfigError, match=r"profile 'sdxl_1024' is for text_embeds \[1280\].*\[1024\]"):
        resolve_shapes(p, inputs, {"sample_shape": [4, 128, 128]})
    sd15 = [i for i in inputs if i["name"] not in ("text_embeds", "time_ids")]  # an SD-1.5 export
    with pytest.raises(ConfigError, match=r"sets shapes.text_embeds but this model has no SDXL-class"):
        resolve_shapes(p, sd15, {"sample_shape": [4, 128, 128]})
    with pytest.raises(ConfigError, match=r"shapes.time_ids must be a list of 1 positive integers"):
        profile_from_dict({"shapes": {"time_ids": [2, 3]}})
