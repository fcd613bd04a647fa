"""``moa-serve``: an OpenAI-compatible HTTP API (FastAPI + uvicorn) in front of the batching engine.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(both with ``stream: true``, server-sent events). Requests are validated before they are queued; a bad
one gets a 4xx JSON error in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``) and
the server goes on. A full queue answers 503. SIGTERM (or Ctrl-C) stops taking requests, gives those in
flight ``shutdown_timeout`` seconds to finish and cancels the rest.

The extension field ``moa_router: true`` in a request adds ``moa_router`` to the response: the mean
gate per layer x expert over the request's prompt and answer tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

from omegaconf import DictConfig
from pydantic import BaseModel, ConfigDict, Field

from moa_train.errors import MoATrainError
from moa_train.serve.engine import Engine, EngineStopped, QueueFull, Request, SamplingParams
from moa_train.serve.load import Loaded, api_key, chat_ids, check_settings, load, sampling_from_config


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields of the OpenAI API this server does not use

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)
    moa_router: bool = False


class _Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Common):
    prompt: str | list[str]


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error_body(status: int, message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class Service:
    """The engine, the model's name and limits, and the conversion of API requests into engine requests."""

    def __init__(
        self, loaded: Loaded, engine: Engine, defaults: SamplingParams, max_context: int | None
    ) -> None:
        self.loaded, self.engine, self.defaults = loaded, engine, defaults
        self.max_context = max_context or loaded.context_length
        self.created = int(time.time())

    def sampling(self, body: _Common, max_tokens: int | None) -> SamplingParams:
        stop = body.stop if body.stop is not None else list(self.defaults.stop)
        params = SamplingParams(
            max_new_tokens=max_tokens or self.defaults.max_new_tokens,
            temperature=self.defaults.temperature if body.temperature is None else body.temperature,
            top_p=self.defaults.top_p if body.top_p is None else body.top_p,
            seed=self.defaults.seed if body.seed is None else body.seed,
            stop=tuple([stop] if isinstance(stop, str) else stop),
        )
        try:
            return params.check()
        except MoATrainError as exc:
            raise ApiError(400, str(exc), param="stop") from None

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.loaded.name:
            raise ApiError(
                404,
                f"model {name!r} is not served here; this server serves {self.loaded.name!r}",
                kind="not_found_error",
                param="model",
            )

    def check_length(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if self.max_context and len(ids) + params.max_new_tokens > self.max_context:
            raise ApiError(
                400,
                f"too many tokens: the prompt has {len(ids)} and max_tokens asks for {params.max_new_tokens}, "
                f"more than the {self.max_context} this model takes; shorten the prompt or lower max_tokens",
                param="max_tokens",
            )

    def submit(
        self, ids: list[int], params: SamplingParams, router: bool, stream: bool
    ) -> tuple[Request, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_text(delta: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("text", delta))

        def on_done(request: Request) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("done", request))

        request = Request(ids, params, router=router, on_text=on_text if stream else None, on_done=on_done)
        try:
            self.engine.submit(request)
        except QueueFull as exc:
            raise ApiError(503, str(exc), kind="server_overloaded") from None
        except EngineStopped as exc:
            raise ApiError(503, str(exc), kind="server_shutting_down") from None
        return request, events


def _usage(requests: list[Request]) -> dict[str, int]:
    prompt = sum(len(r.prompt_ids) for r in requests)
    completion = sum(len(r.tokens) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(request: Request) -> str:
    if request.finish_reason == "error":
        raise ApiError(500, f"generation failed: {request.error}", kind="server_error")
    return "length" if request.finish_reason in ("length", "cancelled") else "stop"


async def _wait(request: Request, events: asyncio.Queue) -> Request:
    try:
        while True:
            kind, value = await events.get()
            if kind == "done":
                return value
    except asyncio.CancelledError:  # the client went away
        request.cancel()
        raise


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def build_app(service: Service, key: str | None = None) -> Any:
    """The FastAPI application (no server started): routes, validation and error bodies."""
    # deferred: optional extra [serve]
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="moa-serve", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(exc.status, exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return JSONResponse(
                _error_body(400, "the request body is not valid JSON", "invalid_request_error"), 400
            )
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if not where:  # the body itself: not JSON, or not an object
            message = "the request body must be a JSON object (Content-Type: application/json)"
        else:
            message = f"{where}: {first.get('msg')}"
        return JSONResponse(
            _error_body(400, message, "invalid_request_error", where or None), status_code=400
        )

    @app.exception_handler(HTTPException)
    async def _http(_: HttpRequest, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            _error_body(exc.status_code, str(exc.detail), "invalid_request_error"),
            status_code=exc.status_code,
        )

    @app.middleware("http")
    async def _auth(request: HttpRequest, call_next: Any) -> Any:
        if key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {key}":
                body = _error_body(
                    401, "missing or wrong API key; send Authorization: Bearer <key>", "authentication_error"
                )
                return JSONResponse(body, status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.loaded.name, **service.engine.load}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {
            "id": service.loaded.name,
            "object": "model",
            "created": service.created,
            "owned_by": "moa_train",
        }
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        service.check_model(body.model)
        params = service.sampling(body, body.max_completion_tokens or body.max_tokens)
        try:
            ids = chat_ids(service.loaded.tokenizer, [m.model_dump() for m in body.messages])
        except MoATrainError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        service.check_length(ids, params)
        request, events = service.submit(ids, params, body.moa_router, body.stream)
        meta = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": service.loaded.name,
        }
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            base = {**meta, "object": "chat.completion.chunk"}
            opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            stream = _stream(request, events, base, usage, _chat_choice, opening)
            return StreamingResponse(stream, media_type="text/event-stream")
        done = await _wait(request, events)
        message = {"role": "assistant", "content": done.text}
        out = {
            **meta,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": _finish(done), "logprobs": None}],
            "usage": _usage([done]),
        }
        if body.moa_router:
            out["moa_router"] = done.router_summary
        return out

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        service.check_model(body.model)
        params = service.sampling(body, body.max_tokens)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
        if body.stream and len(prompts) > 1:
            raise ApiError(400, "stream=true takes one prompt", param="prompt")
        ids = [list(service.loaded.tokenizer(p)["input_ids"]) for p in prompts]
        for row in ids:
            service.check_length(row, params)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.loaded.name}
        if body.stream:
            request, events = service.submit(ids[0], params, body.moa_router, True)
            usage = bool((body.stream_options or {}).get("include_usage"))
            base = {**meta, "object": "text_completion"}
            stream = _stream(request, events, base, usage, _completion_choice)
            return StreamingResponse(stream, media_type="text/event-stream")
        submitted = [service.submit(row, params, body.moa_router, False) for row in ids]
        done = [await _wait(r, e) for r, e in submitted]
        choices = [
            {"index": i, "text": r.text, "finish_reason": _finish(r), "logprobs": None}
            for i, r in enumerate(done)
        ]
        out = {**meta, "object": "text_completion", "choices": choices, "usage": _usage(done)}
        if body.moa_router:
            out["moa_router"] = [r.router_summary for r in done]
        return out

    return app


async def _events(request: Request, events: asyncio.Queue) -> AsyncIterator[tuple[str, Any]]:
    try:
        while True:
            kind, value = await events.get()
            yield kind, value
            if kind == "done":
                return
    finally:  # the client disconnected (or the response ended): stop generating for it
        if request.finish_reason is None:
            request.cancel()


def _chat_choice(text: str | None, finish: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}


def _completion_choice(text: str | None, finish: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text or "", "finish_reason": finish}


async def _stream(
    request: Request, events: asyncio.Queue, base: dict, usage: bool, choice: Any, opening: dict | None = None
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, a last chunk with the finish reason (and the
    router summary when asked), the usage chunk when asked, then ``[DONE]``."""
    if opening is not None:
        yield _sse({**base, "choices": [opening]})
    async for kind, value in _events(request, events):
        if kind == "text":
            yield _sse({**base, "choices": [choice(value, None)]})
            continue
        last = {**base, "choices": [choice(None, _stream_finish(value))]}
        if request.router:
            last["moa_router"] = value.router_summary
        yield _sse(last)
        if usage:
            yield _sse({**base, "choices": [], "usage": _usage([value])})
    yield _sse("[DONE]")


def _stream_finish(request: Request) -> str:
    return (
        "error"
        if request.finish_reason == "error"
        else ("length" if request.finish_reason in ("length", "cancelled") else "stop")
    )


def _server_class() -> type:
    # deferred: optional extra [serve]
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server without its re-raise of the stop signal after shutdown: a SIGTERM that
        stops the server gracefully ends the process with status 0 (a second signal forces the exit)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():  # embedded (tests): no handlers
                yield
                return
            stops = (signal.SIGINT, signal.SIGTERM)
            previous = {s: signal.signal(s, self.handle_exit) for s in stops}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket before the model loads, so a taken port fails in a second, not after a load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MoATrainError(
            f"cannot listen on {host}:{port} ({exc.strerror}); the port is in use or the address "
            "is not this machine's: pass another port= or host="
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def start(cfg: DictConfig) -> tuple[Any, socket.socket, Engine, Loaded]:
    """Check the settings, take the port, load the model, start the engine: (uvicorn server, its
    listening socket, the engine, the model), ready for ``server.run(sockets=[sock])``."""
    try:
        # deferred: optional extra [serve]; checked here for one clear error
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise MoATrainError("moa-serve needs fastapi and uvicorn: pip install 'moa_train[serve]'") from None

    check_settings(cfg)
    port = cfg.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise MoATrainError(f"port must be an integer in [0, 65535], got {port!r}")
    for name in ("max_queue", "shutdown_timeout"):
        value = cfg.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "max_queue" else 0):
            raise MoATrainError(f"{name} must be a positive integer, got {value!r}")
    max_context = cfg.get("max_context")
    if max_context is not None and (
        isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 2
    ):
        raise MoATrainError(f"max_context must be an integer >= 2 or null, got {max_context!r}")
    if str(cfg.get("log_level")) not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise MoATrainError(f"log_level={cfg.get('log_level')!r} is not known; choose warning, info or debug")
    sock = bind(str(cfg.host), int(port))
    try:
        defaults = sampling_from_config(cfg)
        loaded = load(cfg)
    except BaseException:
        sock.close()
        raise
    engine = loaded.engine(cfg).start()
    service = Service(loaded, engine, defaults, max_context)
    app = build_app(service, api_key(cfg))
    config = uvicorn.Config(
        app, log_level=str(cfg.log_level), timeout_graceful_shutdown=int(cfg.shutdown_timeout), lifespan="off"
    )
    return _server_class()(config), sock, engine, loaded


def run(cfg: DictConfig) -> None:
    """Serve until SIGTERM / Ctrl-C: finish the requests in flight (up to shutdown_timeout), cancel the rest."""
    server, sock, engine, loaded = start(cfg)
    host, bound_port = sock.getsockname()[:2]
    print(
        f"moa-serve: {loaded.name} on http://{host}:{bound_port}/v1 (OpenAI-compatible; Ctrl-C or SIGTERM stops)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run(sockets=[sock])  # a graceful shutdown on SIGTERM / SIGINT (see _server_class)
    finally:
        engine.stop(cancel=True, timeout=10)
        sock.close()
    print("moa-serve: stopped", file=sys.stderr, flush=True)
