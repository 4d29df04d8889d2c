"""OpenAI-compatible HTTP server (FastAPI) over the continuous-batching engine.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (server-sent events when
``stream`` is true), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text),
``GET /info`` (what the web page needs: model name, spiking flag, limits) and ``GET /`` (the
web chat page). With an API key set, ``/v1/*`` and ``/info`` need ``Authorization: Bearer KEY``.

Every error is JSON ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for the
client's mistakes (400 malformed, 401 key, 404 unknown model or route, 413 body too large) and
500 for ours; the engine keeps running after either. A request whose client disconnects is
cancelled at the next decode step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from spikingbrain.errors import SpikingBrainError
from spikingbrain.serve.engine import Engine, Event
from spikingbrain.serve.generation import DEFAULT_PREFILL_CHUNK, chat_prompt_ids
from spikingbrain.serve.metrics import Metrics
from spikingbrain.serve.protocol import APIError, GenerationRequest, Limits, parse_body, parse_chat, parse_completion

log = logging.getLogger("spikingbrain.serve")
PROTECTED = ("/v1/", "/info")
KNOWN_PATHS = {"/", "/health", "/metrics", "/info", "/v1/models", "/v1/chat/completions", "/v1/completions"}


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type_, code=code).body(), status_code=status)


def create_app(model, tokenizer, model_name: str = "spikingbrain", api_key: str | None = None,
               limits: Limits | None = None, max_batch: int = 16, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
               spike_probe=None) -> FastAPI:
    """Build the app; the engine thread starts with the app (lifespan) and stops with it."""
    limits = limits or Limits()
    metrics = Metrics()
    engine = Engine(model, tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk,
                    metrics=metrics, spike_probe=spike_probe)
    served = [model_name]
    spiking = spike_probe is not None

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="SpikingBrain", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    # ------------------------------------------------------------------ cross-cutting
    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        if api_key and path.startswith(PROTECTED):
            header = request.headers.get("authorization", "")
            given = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if not given:
                response = _error(401, "missing API key: send 'Authorization: Bearer YOUR_KEY'", code="missing_api_key")
            elif not hmac.compare_digest(given.encode(), api_key.encode()):
                response = _error(401, "incorrect API key", code="invalid_api_key")
            else:
                response = None
            if response is not None:
                metrics.count_request(path, 401)
                return response
        response = await call_next(request)
        metrics.count_request(path if path in KNOWN_PATHS else "other", response.status_code)
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}", type_="server_error")

    # ------------------------------------------------------------------ plain routes
    @app.get("/health")
    async def health():
        alive = engine.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.snapshot()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "spikingbrain"}
                                           for name in served]}

    @app.get("/info")
    async def info():
        return {"model": model_name, "spiking": spiking, "max_tokens_cap": limits.max_tokens_cap,
                "max_prompt_tokens": limits.max_prompt_tokens, "max_batch": max_batch}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(resources.files("spikingbrain.serve").joinpath("static/index.html").read_text("utf-8"))

    # ------------------------------------------------------------------ generation
    async def read_request(request: Request, parse) -> GenerationRequest:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_request_bytes:
            raise APIError(413, f"request body is {length} bytes; the limit is {limits.max_request_bytes}",
                           code="request_too_large")
        raw = b""
        async for piece in request.stream():  # bounded read: stop as soon as the limit is passed
            raw += piece
            if len(raw) > limits.max_request_bytes:
                raise APIError(413, f"request body exceeds {limits.max_request_bytes} bytes", code="request_too_large")
        return parse(parse_body(raw, limits), limits, served)

    async def prompt_ids(req: GenerationRequest) -> list[int]:
        def tokenize():
            if req.messages is not None:
                return chat_prompt_ids(tokenizer, req.messages)
            if isinstance(req.prompt, list):
                return list(req.prompt)
            return tokenizer(req.prompt, add_special_tokens=False)["input_ids"]

        try:
            ids = await anyio.to_thread.run_sync(tokenize)
        except SpikingBrainError as e:
            raise APIError(400, str(e), param="messages") from None
        if not ids:
            raise APIError(400, "the prompt is empty", param="messages" if req.messages is not None else "prompt")
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                                f"{limits.max_prompt_tokens}", code="context_length_exceeded")
        vocab = getattr(model.config, "vocab_size", None)
        if vocab and max(ids) >= vocab or min(ids) < 0:
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return ids

    def submit(ids: list[int], req: GenerationRequest):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        handle = engine.submit(ids, req.params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        return handle, events

    def usage(info: dict) -> dict:
        return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}

    def extras(info: dict) -> dict:
        return {"tokens_per_second": round(info["tokens_per_second"], 3), "time_to_first_token_s": round(info["ttft_s"], 4),
                "spike_sparsity": info["spike_sparsity"]}

    async def generate(request: Request, parse, chat: bool):
        req = await read_request(request, parse)
        ids = await prompt_ids(req)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def choice(text: str | None, finish: str | None, stream: bool) -> dict:
            if chat:
                key, value = ("delta", {} if text is None else {"content": text}) if stream else \
                    ("message", {"role": "assistant", "content": text})
                return {"index": 0, key: value, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        if not req.stream:
            handle, events = submit(ids, req)
            info = await wait_done(request, handle, events)
            return {"id": rid, "object": obj, "created": created, "model": req.model,
                    "choices": [choice(info["text"], info["finish_reason"], False)], "usage": usage(info),
                    "spikingbrain": extras(info)}

        chunk_obj = obj + ".chunk" if chat else obj

        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def chunk(ch: dict, **more) -> str:
            return sse({"id": rid, "object": chunk_obj, "created": created, "model": req.model, "choices": [ch], **more})

        async def stream():
            # submitted here, not before: a client gone before the stream starts costs nothing
            handle, events = submit(ids, req)
            done = False
            try:
                if chat:
                    yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                 "logprobs": None})
                while True:
                    ev = await events.get()
                    if ev.kind == "delta":
                        live = {"spikingbrain": ev.info} if ev.info else {}
                        yield chunk(choice(ev.text, None, True), **live)
                    elif ev.kind == "done":
                        done = True
                        yield chunk(choice(None if chat else "", ev.info["finish_reason"], True),
                                    spikingbrain=extras(ev.info))
                        if req.include_usage:
                            yield sse({"id": rid, "object": chunk_obj, "created": created, "model": req.model,
                                       "choices": [], "usage": usage(ev.info)})
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        done = True
                        yield sse(APIError(500, ev.text, "server_error").body())
                        yield "data: [DONE]\n\n"
                        return
            finally:
                if not done:  # the client went away: free its batch slot
                    handle.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def wait_done(request: Request, handle, events: asyncio.Queue) -> dict:
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        raise APIError(499, "client disconnected", code="client_closed_request") from None
                    continue
                if ev.kind == "done":
                    return ev.info
                if ev.kind == "error":
                    raise APIError(500, ev.text, "server_error")
        except asyncio.CancelledError:
            handle.cancel()
            raise

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, parse_chat, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, parse_completion, chat=False)

    return app


class BackgroundServer:
    """Run ``app`` with uvicorn in a daemon thread on an already-bound loopback socket (port 0
    picks a free one): ``with BackgroundServer(app) as srv: srv.url``. For tests and embedding."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = None

    def __enter__(self) -> "BackgroundServer":
        import threading

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
