"""Server settings: one frozen dataclass with real defaults, checked once at construction.

Plain Python (no FastAPI import), so the CLI can build and check it before the server stack loads.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from saq_deploy.errors import BadOptionError, ConfigError

# Absolute caps that the schema enforces whatever the server is configured with.
HARD_MAX_N = 64
HARD_MAX_STEPS = 1000
HARD_MAX_CFG = 50.0
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class ServeConfig:
    """How the server batches, queues and guards requests.

    ``max_batch``: images per engine run (capped further by the engine profile's max batch, which
    counts UNet rows: with classifier-free guidance each image takes two).
    ``queue_size``: requests waiting for the engine; one more is answered 429 with Retry-After.
    ``timeout_s``: per request, from arrival to result (queue wait included); past it: 504.
    ``strict``: refuse (422) sampler/steps/spacing outside the calibrated envelope instead of
    serving them with an ``X-SAQ-Warning`` header.
    ``allow_ungated``: serve an engine that has not passed its parity gate (development only).
    ``header_timeout_s`` / ``body_timeout_s``: a client must send its request line and headers within
    the first, then its body within the second; past either: 408 and the connection is closed
    (slow or half-open clients would otherwise hold sockets for ever).
    ``max_in_flight``: requests being handled at once; one more gets 503. The liveness and
    readiness probes are exempt, and connections still sending their headers do not count.
    """

    max_batch: int = 8
    queue_size: int = 64
    timeout_s: float = 60.0
    strict: bool = False
    max_body_bytes: int = 1 << 20
    max_n: int = 16
    max_steps: int = 100
    max_cfg: float = 20.0
    max_tokens: int = 512  # cross-attention models: embedding rows per request
    batch_wait_ms: float = 2.0  # how long the worker waits for more compatible requests
    allow_ungated: bool = False
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_in_flight: int = 512
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        checks = [
            ("max_batch", self.max_batch >= 1, ">= 1"),
            ("queue_size", self.queue_size >= 1, ">= 1"),
            ("timeout", self.timeout_s > 0, "> 0"),
            ("max_body_bytes", self.max_body_bytes >= 1024, ">= 1024"),
            ("max_n", 1 <= self.max_n <= HARD_MAX_N, f"in 1..{HARD_MAX_N}"),
            ("max_steps", 1 <= self.max_steps <= HARD_MAX_STEPS, f"in 1..{HARD_MAX_STEPS}"),
            ("max_cfg", 0 <= self.max_cfg <= HARD_MAX_CFG, f"in 0..{HARD_MAX_CFG}"),
            ("max_tokens", self.max_tokens >= 1, ">= 1"),
            ("batch_wait_ms", 0 <= self.batch_wait_ms <= 1000, "in 0..1000"),
            ("header_timeout", 0 < self.header_timeout_s <= 3600, "in (0, 3600] seconds"),
            ("body_timeout", 0 < self.body_timeout_s <= 3600, "in (0, 3600] seconds"),
            ("max_in_flight", self.max_in_flight >= 1, ">= 1"),
        ]
        for name, ok, want in checks:
            if not ok:
                value = getattr(self, name, getattr(self, name + "_s", None))
                raise BadOptionError(f"--{name.replace('_', '-')} must be {want}, got {value}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("the API key is empty")

    def limits(self) -> dict:
        """What /v1/model tells clients about request limits."""
        return {"max_n": self.max_n, "max_steps": self.max_steps, "cfg": [0.0, self.max_cfg],
                "max_tokens": self.max_tokens, "max_body_bytes": self.max_body_bytes,
                "max_batch": self.max_batch, "queue_size": self.queue_size, "timeout_s": self.timeout_s,
                "strict": self.strict, "auth": "bearer" if self.api_key else "none",
                "header_timeout_s": self.header_timeout_s, "body_timeout_s": self.body_timeout_s,
                "max_in_flight": self.max_in_flight}


def load_api_key(path: str | os.PathLike) -> tuple[str, str | None]:
    """(key, warning or None) from a file holding one token (surrounding whitespace ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--api-key-file '{path}' does not exist or is not a file")
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--api-key-file '{path}' cannot be read as UTF-8 text ({e})") from e
    if not key:
        raise ConfigError(f"--api-key-file '{path}' is empty")
    if any(c.isspace() for c in key) or not key.isascii():
        raise ConfigError(f"--api-key-file '{path}' must hold one ASCII token without spaces")
    if len(key) < 16:
        raise ConfigError(f"the API key in '{path}' is shorter than 16 characters; use e.g. "
                          "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    warning = None
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        warning = f"--api-key-file '{path}' is readable by other users (chmod 600 it)"
    return key, warning


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")
