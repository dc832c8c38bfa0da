"""The HTTP side: Starlette routes over the scheduler (docs/serve.md).

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models[/{id}]
    GET /health (no key)        GET /metrics           POST /tokenize   POST /detokenize

Generation never runs on the event loop: a request is validated and tokenized here, submitted to
the scheduler's worker thread, and its tokens come back through the ticket's queue. A client
that disconnects (or closes a stream) is noticed on `http.disconnect` and its rows are cancelled;
the worker drops them before its next decode step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dsexport.core.errors import UserError
from dsexport.core.jsonio import parse_json

from . import openai_api as api
from .metrics import CONTENT_TYPE, expert_cache_samples, server_metrics
from .scheduler import Scheduler
from .streaming import EventStream, collect, watch_disconnect

OPEN_PATHS = ("/health",)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


@dataclasses.dataclass
class ServeOptions:
    model: str  # the model id clients pass
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    keepalive_s: float = 15.0  # ": keep-alive" comment lines while a stream waits
    loopback_only_hosts: bool = True  # refuse Host headers other than loopback names (DNS rebinding)


def _error_response(error: api.APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class Guard:
    """ASGI middleware: API key (except /health), Host header on a loopback bind, request size,
    JSON content type on POST, and the requests counter."""

    def __init__(self, app, options: ServeOptions, metrics):
        self.app, self.options, self.metrics = app, options, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = self._check(scope)
        status = {}

        async def counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if error is not None:
            await _error_response(error)(scope, receive, counted)
        else:
            await self.app(scope, receive, counted)
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        self.metrics.inc("dsexport_requests_total", endpoint=path, status=str(status.get("code", 0)))

    def _check(self, scope) -> api.APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.options.loopback_only_hosts:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
            if name not in LOOPBACK_NAMES:
                return api.APIError(400, f"Host {host!r} is not this server's (bound to loopback; DNS rebinding "
                                    "protection)", code="invalid_host")
        key = self.options.api_key
        if key and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return api.APIError(401, "Incorrect API key provided" if token else "Missing API key: send "
                                    "Authorization: Bearer KEY", type="invalid_request_error", code="invalid_api_key")
        if scope["method"] == "POST":
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.options.max_body_bytes):
                return _too_large(self.options.max_body_bytes)
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return api.APIError(415, "send the request body as JSON with Content-Type: application/json",
                                    code="unsupported_media_type")
        return None


def _too_large(limit: int) -> api.APIError:
    return api.APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


async def read_json(request: Request, limit: int):
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    try:
        return parse_json(bytes(body), "the request body")
    except UserError as e:
        raise api.invalid(str(e)) from None


class Server:
    """The application's state: engine, scheduler, options and metrics."""

    def __init__(self, engine, scheduler: Scheduler, options: ServeOptions):
        self.engine, self.scheduler, self.options = engine, scheduler, options
        self.metrics = scheduler.metrics
        self.created = int(time.time())
        self.limits = api.Limits(options.model, engine.max_context, scheduler.capacity, scheduler.draft)
        self.token_text = api.TokenText(engine.tokenizer)
        self.metrics.collect_with(self._gauges)

    def _gauges(self) -> list:
        s = self.scheduler
        out = [("dsexport_queue_depth", "gauge", "Requests admitted that have no token yet", [({}, s.queued)]),
               ("dsexport_running_rows", "gauge", "Rows in the decode batch", [({}, s.running_rows)]),
               ("dsexport_capacity_rows", "gauge", "Rows admitted at most (parallel + max_queue)",
                [({}, s.capacity)])]
        return out + expert_cache_samples(s.cache.as_stats())

    # ---- endpoints ----------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        s = self.scheduler
        if not s.alive:
            return JSONResponse({"status": "error", "error": "the engine worker stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.options.model, "queued": s.queued,
                             "running_rows": s.running_rows, "capacity": s.capacity})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [api.model_entry(self.options.model, self.created)]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.options.model:
            raise api.APIError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
        return JSONResponse(api.model_entry(name, self.created))

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, api.parse_chat)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, api.parse_completion)

    async def _generate(self, request: Request, parse) -> Response:
        body = await read_json(request, self.options.max_body_bytes)
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(None, parse, body, self.engine, self.limits)  # tokenizing: off the loop
        ticket = self.scheduler.submit(job, loop)
        if job.stream:
            return EventStream(self, ticket)
        watcher = asyncio.ensure_future(watch_disconnect(request.receive))
        result = asyncio.ensure_future(collect(self, ticket))
        done, _ = await asyncio.wait({watcher, result}, return_when=asyncio.FIRST_COMPLETED)
        if result not in done:  # the client left: free its rows
            self.scheduler.cancel(ticket)
            result.cancel()
            return Response(status_code=499)
        watcher.cancel()
        return JSONResponse(result.result())

    async def tokenize(self, request: Request) -> Response:
        body = await read_json(request, self.options.max_body_bytes)
        if not isinstance(body, dict):
            raise api.invalid("the request body must be a JSON object")
        try:
            if body.get("messages") is not None:
                ids = self.engine.encode_chat(body["messages"])
            else:
                text = body.get("content", body.get("prompt"))
                if not isinstance(text, str):
                    raise api.invalid("pass content (a string) or messages", param="content")
                ids = self.engine.encode(text, parse_special=bool(body.get("parse_special", False)))
        except UserError as e:
            raise api.invalid(str(e)) from None
        return JSONResponse({"tokens": ids, "count": len(ids), "max_context": self.engine.max_context})

    async def detokenize(self, request: Request) -> Response:
        body = await read_json(request, self.options.max_body_bytes)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise api.invalid("tokens must be a list of token ids", param="tokens")
        vocab = self.engine.config.vocab_size
        if any(not 0 <= t < vocab for t in tokens):
            raise api.invalid(f"token ids must be in 0..{vocab - 1}", param="tokens")
        try:
            return JSONResponse({"content": self.engine.decode(tokens)})
        except UserError as e:
            raise api.invalid(str(e)) from None


KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize",
               "/detokenize")


async def _api_error(request: Request, exc: api.APIError) -> Response:
    return _error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return _error_response(api.APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code=kind))


async def _crash(request: Request, exc: Exception) -> Response:
    return _error_response(api.APIError(500, f"internal error ({type(exc).__name__})", code="internal_error"))


def create_app(engine, scheduler: Scheduler, options: ServeOptions):
    """The ASGI application (Starlette wrapped in the Guard middleware); `app.state.server` holds the state."""
    server = Server(engine, scheduler, options)
    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/tokenize", server.tokenize, methods=["POST"]),
        Route("/detokenize", server.detokenize, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={api.APIError: _api_error, HTTPException: _http_error,
                                                        Exception: _crash})
    app.state.server = server
    guarded = Guard(app, options, scheduler.metrics)
    guarded.state = app.state
    return guarded


def make_server_state(engine, model: str, parallel: int = 4, max_queue: int = 16, **options):
    """Scheduler (started) and app for an engine: what `dsexport serve` and the tests run."""
    scheduler = Scheduler(engine, parallel=parallel, max_queue=max_queue, metrics=server_metrics())
    scheduler.start()
    return create_app(engine, scheduler, ServeOptions(model=model, **options)), scheduler


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


__all__ = ["ServeOptions", "create_app", "is_loopback", "make_server_state"]
