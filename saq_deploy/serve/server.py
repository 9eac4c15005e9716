"""Run the app under uvicorn: load (refusing mismatched hashes), say loudly what is unsafe, serve,
and on SIGINT/SIGTERM stop accepting, let in-flight requests finish, then drain the worker.

Slow clients: requests must arrive within ``--header-timeout`` / ``--body-timeout`` (see
serve/protocol.py), the open-files limit is raised so idle sockets cannot starve accept(), and
the in-flight limit is the app's (probes exempt), not uvicorn's ``limit_concurrency``: uvicorn
counts every open connection, half-open ones included, and answers 503 to all requests,
``/healthz`` too, once they reach the limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from saq_deploy.errors import BackendUnavailableError
from saq_deploy.serve.config import ServeConfig, is_loopback

log = logging.getLogger("saq_deploy.serve")
KEEP_ALIVE_S = 65
FEW_FDS = 4096  # below this many open files, warn: about that many idle sockets stop accept()


def require_serve_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError(f"serving needs the 'serve' extra ({e.name} is missing): "
                                      "pip install 'saq-deploy[serve]'") from e


def startup_warnings(served, config: ServeConfig, host: str) -> list[str]:
    """What the operator must hear before the first request."""
    out = []
    if served.gate.required and not served.gate.passed:
        if config.allow_ungated:
            out.append(f"WARNING: serving an UNGATED engine (--allow-ungated, development only): {served.gate.reason}")
        else:
            out.append(f"NOT READY: {served.gate.reason}. /readyz answers 503 and /v1/generate is refused "
                       "until the engine passes saq-deploy validate (or --allow-ungated, development only)")
    if not is_loopback(host) and config.api_key is None:
        out.append(f"WARNING: listening on {host} without --api-key-file: anyone who can reach this port "
                   "can generate")
    return out


def uvicorn_config(app, config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000,
                   log_level: str = "info"):
    """The uvicorn.Config that ``serve`` runs (tests start the same one in a thread)."""
    import uvicorn

    from saq_deploy.serve.protocol import deadline_protocol

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level in ("info", "debug"),
                          http=deadline_protocol(config.header_timeout_s, config.body_timeout_s),
                          timeout_graceful_shutdown=int(config.timeout_s) + 5, server_header=False,
                          proxy_headers=False, limit_concurrency=None,
                          # longer than common load-balancer idle timeouts (60 s), so the balancer,
                          # not this server, closes idle connections (no reuse-after-close races)
                          timeout_keep_alive=KEEP_ALIVE_S)


def open_files_line() -> str:
    """Raise the open-files limit to its hard limit; one line saying what it is."""
    from saq_deploy.serve.protocol import raise_fd_limit

    before, now, hard = raise_fd_limit()
    line = f"open-files limit {now}" + (f" (raised from {before})" if now != before else "") + f", hard {hard}"
    if now < FEW_FDS:
        line = f"WARNING: {line}: about {now} idle connections exhaust it (raise it with ulimit -n / the " \
               "container's nofile limit)"
    return line


def run_server(artifact: str | Path, *, backend: str = "onnxruntime", engine: str | Path | None = None,
               host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
               threads: int | None = None, log_level: str = "info", force: bool = False,
               echo: Callable[[str], None] = print) -> None:
    require_serve_extra()
    import uvicorn

    from saq_deploy.serve.app import create_app
    from saq_deploy.serve.model import load_served

    config = config or ServeConfig()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    served = load_served(artifact, backend, engine=engine, threads=threads, force=force)
    for line in startup_warnings(served, config, host):
        echo(line)
    info = served.info
    echo(f"serving {info['model']['name']} ({info['calibration']['method']}, {info['calibration']['bits']}) "
         f"with {backend} on http://{host}:{port}  [max batch {config.max_batch}, queue {config.queue_size}, "
         f"timeout {config.timeout_s:g} s, auth {'bearer' if config.api_key else 'off'}]")
    echo(f"slow clients: headers within {config.header_timeout_s:g} s, body within {config.body_timeout_s:g} s "
         f"(then 408); at most {config.max_in_flight} requests in flight (then 503; /healthz and /readyz "
         f"exempt); {open_files_line()}")
    if served.kind == "text":
        p = served.prompts
        echo(f"prompts: {'accepted' if p.accepted else 'NOT accepted'}: {p.reason}" + (f" ({p.detail})" if p.detail else ""))
    if info["model"].get("decoded_by_vae"):
        echo(f"samples are decoded by the pipeline's VAE: images {info['model']['image_shape']}")
    app = create_app(served, config)
    uvicorn.Server(uvicorn_config(app, config, host=host, port=port, log_level=log_level)).run()
