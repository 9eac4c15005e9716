"""Run the app under uvicorn: load (refusing mismatched hashes), say loudly what is unsafe, serve,
and on SIGINT/SIGTERM stop accepting, let in-flight requests finish, then drain the worker."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from saq_deploy.errors import BackendUnavailableError
from saq_deploy.serve.config import ServeConfig, is_loopback

log = logging.getLogger("saq_deploy.serve")
KEEP_ALIVE_S = 65


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


def run_server(artifact: str | Path, *, backend: str = "onnxruntime", engine: str | Path | None = None,
               host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
               threads: int | None = None, log_level: str = "info",
               echo: Callable[[str], None] = print) -> None:
    require_serve_extra()
    import uvicorn

    from saq_deploy.serve.app import create_app
    from saq_deploy.serve.model import load_served

    config = config or ServeConfig()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    served = load_served(artifact, backend, engine=engine, threads=threads)
    for line in startup_warnings(served, config, host):
        echo(line)
    info = served.info
    echo(f"serving {info['model']['name']} ({info['calibration']['method']}, {info['calibration']['bits']}) "
         f"with {backend} on http://{host}:{port}  [max batch {config.max_batch}, queue {config.queue_size}, "
         f"timeout {config.timeout_s:g} s, auth {'bearer' if config.api_key else 'off'}]")
    app = create_app(served, config)
    uv = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level in ("info", "debug"),
                        timeout_graceful_shutdown=int(config.timeout_s) + 5, server_header=False,
                        proxy_headers=False, limit_concurrency=max(512, config.queue_size * 8),
                        # longer than common load-balancer idle timeouts (60 s), so the balancer,
                        # not this server, closes idle connections (no reuse-after-close races)
                        timeout_keep_alive=KEEP_ALIVE_S)
    uvicorn.Server(uv).run()
