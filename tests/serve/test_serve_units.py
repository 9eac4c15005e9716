"""Small pieces of the server: schema enums, envelope, capacity, token checks, start-up warnings."""

from __future__ import annotations

from typing import get_args

import pytest

from saq_deploy.errors import ConfigError
from saq_deploy.serve.config import ServeConfig, is_loopback, load_api_key
from saq_deploy.serve.handling import envelope_issues
from saq_deploy.serve.model import Gate
from saq_deploy.serve.security import bearer_matches
from tests.serve.conftest import make_served


def test_schema_names_match_the_registries():
    from saq_deploy.samplers.registry import SAMPLERS
    from saq_deploy.schedules.spacing import SPACINGS
    from saq_deploy.serve.schemas import SamplerName, SpacingName

    assert set(get_args(SamplerName)) == set(SAMPLERS)
    assert set(get_args(SpacingName)) == set(SPACINGS)


def test_envelope():
    cal = {"samplers": ["ddim", "dpm-solver-2"], "steps": 10, "spacing": "quadratic"}
    assert envelope_issues(cal, "ddim", 10, "quadratic") == []
    assert len(envelope_issues(cal, "unipc", 20, "linspace")) == 3
    assert envelope_issues({**cal, "steps": [10, 20]}, "ddim", 20, "quadratic") == []
    assert "no calibrated sampler envelope" in envelope_issues(None, "ddim", 10, None)[0]


def test_capacity_counts_guidance_rows():
    served, _ = make_served()
    assert served.capacity(1.5, 8) == 8
    served.engine_max_batch = 6
    assert served.capacity(1.5, 8) == 3 and served.capacity(1.0, 8) == 6
    served.engine_max_batch = 1
    assert served.capacity(1.5, 8) == 1  # never 0


def test_bearer_matching():
    key = "a" * 32
    assert bearer_matches(f"Bearer {key}", key) and bearer_matches(f"bearer {key}", key)
    for bad in (None, "", key, f"Bearer {key[:-1]}", f"Token {key}", "Bearer é"):
        assert not bearer_matches(bad, key)


def test_api_key_file(tmp_path):
    f = tmp_path / "k"
    f.write_text("  " + "t" * 32 + "\n")
    f.chmod(0o644)
    key, warning = load_api_key(f)
    assert key == "t" * 32 and "readable by other users" in warning
    f.chmod(0o600)
    assert load_api_key(f)[1] is None
    for text, fragment in (("", "is empty"), ("two words here padded", "one ASCII token"), ("short", "shorter")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=fragment):
            load_api_key(f)


def test_config_checks_and_repr_hides_the_key():
    with pytest.raises(ConfigError, match="--queue-size must be >= 1"):
        ServeConfig(queue_size=0)
    with pytest.raises(ConfigError, match="--timeout must be > 0"):
        ServeConfig(timeout_s=0)
    assert "secret" not in repr(ServeConfig(api_key="secret" * 4))
    assert ServeConfig(api_key="x" * 20).limits()["auth"] == "bearer"


def test_startup_warnings():
    from saq_deploy.serve.server import startup_warnings

    served, _ = make_served(gate=Gate(True, False, "no parity gate result"))
    lines = startup_warnings(served, ServeConfig(), "0.0.0.0")
    assert any(ln.startswith("NOT READY") for ln in lines)
    assert any("without --api-key-file" in ln for ln in lines)
    lines = startup_warnings(served, ServeConfig(allow_ungated=True, api_key="k" * 20), "0.0.0.0")
    assert lines == ["WARNING: serving an UNGATED engine (--allow-ungated, development only): no parity gate result"]
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
