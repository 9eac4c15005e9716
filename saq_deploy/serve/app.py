"""The FastAPI app: ``create_app(served, config)``.

    POST /v1/generate   JSON in; JSON with base64 PNGs out, or image/png (n = 1, Accept: image/png)
    GET  /healthz       liveness: the process answers
    GET  /readyz        readiness: worker running and the engine parity-gated (503 otherwise)
    GET  /v1/model      source model, calibration (method, bits, envelope), engine, gate, limits
    GET  /openapi.json, /docs

One ``MicroBatcher`` (one worker thread) runs the model; handlers only validate, enqueue and wait.
"""


import asyncio
import base64
import logging
import time
from contextlib import asynccontextmanager
from typing import get_args

from saq_deploy.errors import SaqError
from saq_deploy.serve.batcher import Job, MicroBatcher, QueueFull, ShuttingDown
from saq_deploy.serve.config import ServeConfig
from saq_deploy.serve.handling import Refused, encode_pngs, plan_request
from saq_deploy.serve.model import ServedModel

log = logging.getLogger("saq_deploy.serve")
UNGATED_WARNING = "UNGATED ENGINE: no passing parity gate; served only because of --allow-ungated (development only)"


def _runner(served: ServedModel):
    def run(specs, batch_size: int):
        t0 = time.perf_counter()
        images = served.run(specs, batch_size)
        run_s = time.perf_counter() - t0
        total = sum(s.n for s in specs)
        return [(img, total, run_s) for img in images]

    return run


def _header_text(text: str) -> str:
    """ASCII on one line: warnings may quote a client's prompt (any Unicode, possibly control
    characters), and header values must be Latin-1 without CR/LF. The JSON body has them verbatim."""
    text = "".join(c if c.isprintable() else " " for c in text)
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _validation_message(errors: list[dict]) -> tuple[int, str, list[dict]]:
    """(status, one sentence, errors without echoed input) for pydantic/FastAPI errors."""
    clean = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]
    if any(e["type"] == "json_invalid" for e in clean):
        return 400, "malformed JSON body", clean
    parts = []
    for e in clean[:5]:
        loc = ".".join(str(x) for x in e["loc"] if x != "body") or "body"
        parts.append(f"{loc}: {e['msg']}")
    more = f" (and {len(clean) - 5} more)" if len(clean) > 5 else ""
    return 422, "invalid request: " + "; ".join(parts) + more, clean


def create_app(served: ServedModel, config: ServeConfig | None = None):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from saq_deploy import __version__
    from saq_deploy.serve.schemas import (
        ErrorResponse,
        GenerateRequest,
        GenerateResponse,
        ReadyResponse,
        SamplerName,
    )
    from saq_deploy.serve.security import GuardMiddleware

    config = config or ServeConfig()
    ungated = served.gate.required and not served.gate.passed
    extra_headers = {"X-SAQ-Warning": UNGATED_WARNING} if ungated and config.allow_ungated else {}
    batcher = MicroBatcher(_runner(served), queue_size=config.queue_size, wait_s=config.batch_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app):
        if ungated:
            level = logging.WARNING if config.allow_ungated else logging.ERROR
            log.log(level, "%s: %s", "SERVING UNGATED ENGINE" if config.allow_ungated else "NOT READY",
                    served.gate.reason)
        batcher.start()
        yield
        log.info("shutting down: draining %d queued request(s)", batcher.depth())
        done = await asyncio.to_thread(batcher.close, drain=True, timeout=config.timeout_s)
        if not done:
            log.warning("the engine worker did not finish within %.0f s", config.timeout_s)

    app = FastAPI(title="saq-deploy", version=__version__, lifespan=lifespan,
                  description="Diffusion samples from a sampling-aware quantized UNet engine.")
    app.state.served, app.state.config, app.state.batcher = served, config, batcher
    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                       extra_headers=extra_headers, max_in_flight=config.max_in_flight)

    def error(status: int, message: str, headers: dict | None = None, detail: list | None = None):
        body = {"error": message} if detail is None else {"error": message, "detail": detail}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # FastAPI parses a body as JSON only when it is labelled JSON; anything else reaches the
        # model unparsed and fails as "not a dictionary", which hides the real mistake
        # (curl -d without -H 'Content-Type: application/json' sends form encoding)
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if request.method in ("POST", "PUT", "PATCH") and not (media == "application/json" or media.endswith("+json")):
            got = f"'{ctype}'" if ctype else "none"
            return error(415, f"the request body must be JSON: send 'Content-Type: application/json' (got {got})")
        status, msg, detail = _validation_message(list(exc.errors()))
        return error(status, msg, detail=detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # routing errors (404, 405 with its Allow header) in the API's {"error": ...} shape,
        # not FastAPI's {"detail": ...}
        messages = {404: f"no such endpoint: {request.url.path}",
                    405: f"method {request.method} is not allowed on {request.url.path}"}
        return error(exc.status_code, messages.get(exc.status_code, str(exc.detail)), headers=exc.headers)

    def readiness() -> tuple[bool, str]:
        if not batcher.running:
            return False, "the engine worker is not running (starting up or shutting down)"
        if ungated and not config.allow_ungated:
            return False, served.gate.reason
        return True, served.gate.reason

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness (engine loaded and parity-gated)", response_model=ReadyResponse,
             responses={503: {"model": ReadyResponse}})
    async def readyz():
        ok, reason = readiness()
        body = {"ready": ok, "reason": reason, "backend": served.backend, "queue_depth": batcher.depth(),
                "gate": {"required": served.gate.required, "passed": served.gate.passed,
                         "allow_ungated": config.allow_ungated}}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/model", summary="What is served")
    async def model_info() -> dict:
        return {**served.info, "gate": {"required": served.gate.required, "passed": served.gate.passed,
                                        "reason": served.gate.reason, **served.gate.detail},
                "samplers": list(get_args(SamplerName)),
                "cond": {"tokens": served.cond_tokens, "dim": served.cond_dim} if served.kind == "text" else None,
                "prompts": served.prompts.as_dict() if served.kind == "text" else None,
                "limits": config.limits(), "batching": batcher.stats.as_dict()}

    err = {"model": ErrorResponse}
    responses = {400: err, 401: err, 406: err, 408: err, 413: err, 415: err, 422: err, 429: err, 503: err, 504: err,
                 200: {"content": {"image/png": {}}}}

    @app.post("/v1/generate", response_model=GenerateResponse, responses=responses, summary="Generate images")
    async def generate(req: GenerateRequest, request: Request):
        t_in = time.monotonic()
        ok, reason = readiness()
        if not ok:
            return error(503, f"not ready: {reason}")
        try:
            if req.prompt is not None or req.negative_prompt is not None:
                # the text encoder runs for a while on the CPU: not on the event loop
                plan = await run_in_threadpool(plan_request, served, config, req)
            else:
                plan = plan_request(served, config, req)
        except Refused as e:
            return error(e.status, e.message)
        accept = request.headers.get("accept", "").lower()
        want_png = "image/png" in accept and req.n == 1
        if "image/png" in accept and req.n > 1 and not ("json" in accept or "*/*" in accept):
            return error(406, "image/png holds one image: use n=1, or Accept: application/json")
        spec = plan.spec
        job = Job(key=spec.key(), n=spec.n, capacity=served.capacity(spec.cfg, config.max_batch), payload=spec)
        try:
            future = batcher.submit(job)
        except QueueFull as e:
            return error(429, f"server busy: {config.queue_size} requests already queued; retry later",
                         headers={"Retry-After": str(e.retry_after_s)})
        except ShuttingDown as e:
            return error(503, str(e))
        try:
            left = config.timeout_s - (time.monotonic() - t_in)
            images, batch_images, run_s = await asyncio.wait_for(asyncio.wrap_future(future), max(left, 0.001))
        except TimeoutError:
            future.cancel()
            return error(504, f"generation did not finish within the {config.timeout_s:g} s request timeout")
        except SaqError as e:
            return error(422, str(e))
        except Exception:  # noqa: BLE001 -- logged with traceback by the worker; the client gets one line
            return error(500, "internal error while generating; see the server log")
        pngs, width, height, mode = await run_in_threadpool(encode_pngs, images)
        headers = {"X-SAQ-Seed": str(plan.seed)}
        if plan.warnings:
            headers["X-SAQ-Warning"] = _header_text(" | ".join(plan.warnings))
        if want_png:
            if plan.labels is not None:
                headers["X-SAQ-Label"] = str(plan.labels[0])
            return Response(pngs[0], media_type="image/png", headers=headers)
        total_ms = (time.monotonic() - t_in) * 1000
        body = GenerateResponse(
            images=[base64.b64encode(p).decode("ascii") for p in pngs], labels=plan.labels, width=width,
            height=height, mode=mode, sampler=spec.sampler, steps=spec.steps, spacing=spec.spacing, cfg=spec.cfg,
            seed=plan.seed, in_envelope=plan.in_envelope, warnings=plan.warnings, batch_images=batch_images,
            queue_ms=round(max(0.0, total_ms - run_s * 1000), 2), run_ms=round(run_s * 1000, 2))
        return JSONResponse(body.model_dump(), headers=headers)

    return app
