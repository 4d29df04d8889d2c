"""OpenAI-compatible HTTP server (FastAPI) over the continuous-batching engine.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (server-sent events when
``stream`` is true; ``echo`` + ``logprobs`` for scoring, as lm-eval's ``local-completions``
uses them), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /info``
(what the web page needs), ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``
and ``GET /`` (the web chat page). ``gate.Gate`` checks Host, API key and Content-Type first.

Every error is JSON ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for the
client's mistakes (400 malformed, 401 key, 404 unknown model or route, 408 body too slow, 413
body too large, 415 not JSON, 429 queue full with ``Retry-After``), 503 while shutting down and
500 for ours; the engine keeps running after any of them. A request whose client disconnects
is cancelled at the next decode step, streaming or not.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from spikingbrain.errors import SpikingBrainError
from spikingbrain.serve.engine import (DEFAULT_MAX_WAITING, DEFAULT_PREFILL_BUDGET, SHUTDOWN_MESSAGE, Engine, Event,
                                       QueueFull, ShuttingDown)
from spikingbrain.serve.gate import LOOPBACK_HOSTS, Gate
from spikingbrain.serve.generation import DEFAULT_PREFILL_CHUNK, chat_prompt_ids
from spikingbrain.serve.metrics import CONTENT_TYPE, Metrics
from spikingbrain.serve.protocol import APIError, GenerationRequest, Limits, parse_body, parse_chat, parse_completion

log = logging.getLogger("spikingbrain.serve")
ROUTES = {"/", "/health", "/metrics", "/info", "/tokenizer_info", "/tokenize", "/detokenize", "/v1/models",
          "/v1/chat/completions", "/v1/completions"}
DEFAULT_PROMPT_TOKENS = 32768  # when the model does not say how far its positions go


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type_, code=code).body(), status_code=status)


def model_max_positions(model) -> int | None:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def create_app(model, tokenizer, model_name: str = "spikingbrain", api_key: str | None = None,
               limits: Limits | None = None, max_batch: int = 16, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
               spike_probe=None, prefill_budget: int = DEFAULT_PREFILL_BUDGET,
               max_waiting: int = DEFAULT_MAX_WAITING, allowed_hosts=LOOPBACK_HOSTS) -> FastAPI:
    """Build the app; the engine thread starts with the app (lifespan) and stops with it.
    ``api_key=None`` serves without a key; an empty key is refused (it would look set but
    let everyone in)."""
    if api_key is not None and not api_key.strip():
        raise SpikingBrainError("the API key is empty: give a non-empty key, or none to serve without one")
    limits = limits or Limits()
    if limits.max_prompt_tokens is None:
        limits.max_prompt_tokens = model_max_positions(model) or DEFAULT_PROMPT_TOKENS
    metrics = Metrics()
    engine = Engine(model, tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk, metrics=metrics,
                    spike_probe=spike_probe, prefill_budget=prefill_budget, max_waiting=max_waiting)
    metrics.bind(engine.snapshot)
    served = [model_name]
    spiking = spike_probe is not None
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="SpikingBrain", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.limits = engine, metrics, limits
    app.add_middleware(Gate, api_key=api_key, allowed_hosts=allowed_hosts, metrics=metrics, routes=ROUTES)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

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
        alive = engine.alive and not engine.draining
        return JSONResponse({"status": "ok" if alive else "unavailable"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "spikingbrain"}
                                           for name in served]}

    @app.get("/info")
    async def info():
        return {"model": model_name, "spiking": spiking, "max_tokens_cap": limits.max_tokens_cap,
                "max_prompt_tokens": limits.max_prompt_tokens, "max_batch": max_batch}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        template = getattr(tokenizer, "chat_template", None)
        return {"tokenizer_class": type(tokenizer).__name__, "vocab_size": vocab,
                "eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
                "eos_token_ids": sorted(engine.eos_ids), "chat_template": template if isinstance(template, str) else None,
                "max_model_len": limits.max_prompt_tokens}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = parse_body(await read_body(request), limits)
        text = body.get("prompt")
        special = body.get("add_special_tokens", False)
        if not isinstance(text, str) or not isinstance(special, bool):
            raise APIError(400, "'prompt' must be a string and 'add_special_tokens' a boolean", param="prompt")
        ids = await anyio.to_thread.run_sync(lambda: tokenizer(text, add_special_tokens=special)["input_ids"])
        return {"tokens": ids, "count": len(ids), "max_model_len": limits.max_prompt_tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = parse_body(await read_body(request), limits)
        ids = body.get("tokens")
        if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                              for t in ids)):
            raise APIError(400, f"'tokens' must be a list of token ids in [0, {vocab})", param="tokens")
        return {"prompt": await anyio.to_thread.run_sync(lambda: tokenizer.decode(ids))}

    page = resources.files("spikingbrain.serve").joinpath("static/index.html").read_text("utf-8")
    page = page.replace('data-key-required="0"', f'data-key-required="{1 if api_key else 0}"')

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    # ------------------------------------------------------------------ generation
    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_request_bytes:
            raise APIError(413, f"request body is {length} bytes; the limit is {limits.max_request_bytes}",
                           code="request_too_large")
        raw = bytearray()

        async def read_all() -> None:
            async for piece in request.stream():  # bounded read: stop as soon as the limit is passed
                raw.extend(piece)
                if len(raw) > limits.max_request_bytes:
                    raise APIError(413, f"request body exceeds {limits.max_request_bytes} bytes",
                                   code="request_too_large")

        try:
            await asyncio.wait_for(read_all(), limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s",
                           code="request_timeout") from None
        return bytes(raw)

    async def read_request(request: Request, parse) -> GenerationRequest:
        return parse(parse_body(await read_body(request), limits), limits, served)

    def check_ids(ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                                f"{limits.max_prompt_tokens}", code="context_length_exceeded")
        if max(ids) >= vocab or min(ids) < 0:
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param=param)
        return ids

    async def prompt_ids(req: GenerationRequest) -> list[list[int]]:
        def tokenize_all():
            if req.messages is not None:
                return [chat_prompt_ids(tokenizer, req.messages)]
            return [list(p) if isinstance(p, list) else tokenizer(p, add_special_tokens=False)["input_ids"]
                    for p in req.prompts]

        try:
            all_ids = await anyio.to_thread.run_sync(tokenize_all)
        except SpikingBrainError as e:
            raise APIError(400, str(e), param="messages") from None
        return [check_ids(ids, "messages" if req.messages is not None else "prompt") for ids in all_ids]

    def submit(ids: list[int], req: GenerationRequest):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            handle = engine.submit(ids, req.params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFull as e:
            metrics.reject("queue_full")
            raise APIError(429, str(e), type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown as e:
            metrics.reject("shutting_down")
            raise APIError(503, str(e), type_="server_error", code="server_shutting_down") from None
        return handle, events

    def usage(infos: list[dict]) -> dict:
        p = sum(i["prompt_tokens"] for i in infos)
        c = sum(i["completion_tokens"] for i in infos)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def extras(info: dict) -> dict:
        return {"tokens_per_second": round(info["tokens_per_second"], 3), "time_to_first_token_s": round(info["ttft_s"], 4),
                "spike_sparsity": info["spike_sparsity"]}

    def token_text(t: int) -> str:
        return tokenizer.decode([t])

    def top_dict(pairs) -> dict:
        out: dict[str, float] = {}
        for t, lp in pairs:  # two ids may decode to the same text: keep the larger
            key = token_text(t)
            out[key] = max(lp, out.get(key, float("-inf")))
        return out

    def completion_logprobs(ids: list[int], info: dict, echo: bool) -> dict:
        entries = [(ids[0], None, None)] + info["prompt_logprobs"] if echo else []
        entries += info["output_logprobs"]
        tokens, offsets, pos = [], [], 0
        for t, _, _ in entries:
            offsets.append(pos)
            tokens.append(token_text(t))
            pos += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else top_dict(top) for _, _, top in entries],
                "text_offset": offsets}

    def chat_logprobs(info: dict) -> dict:
        def item(t, lp):
            text = token_text(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in top]}
                            for t, lp, top in info["output_logprobs"]]}

    async def generate(request: Request, parse, chat: bool):
        req = await read_request(request, parse)
        prompts = await prompt_ids(req)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def choice(text: str | None, finish: str | None, stream: bool, index: int = 0, logprobs=None) -> dict:
            if chat:
                key, value = ("delta", {} if text is None else {"content": text}) if stream else \
                    ("message", {"role": "assistant", "content": text})
                return {"index": index, key: value, "finish_reason": finish, "logprobs": logprobs}
            return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}

        if not req.stream:
            infos = await wait_all(request, [submit(ids, req) for ids in prompts])
            choices = []
            for i, (ids, info) in enumerate(zip(prompts, infos)):
                text = info["text"]
                lp = None
                if req.logprobs is not None:
                    lp = chat_logprobs(info) if chat else completion_logprobs(ids, info, req.echo)
                if req.echo:
                    text = tokenizer.decode(ids) + text
                choices.append(choice(text, info["finish_reason"], False, i, lp))
            return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices,
                    "usage": usage(infos), "spikingbrain": extras(infos[0])}

        chunk_obj = obj + ".chunk" if chat else obj
        ids = prompts[0]
        handle, events = submit(ids, req)  # now: a full queue is a 429, not a broken stream

        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def chunk(ch: dict, **more) -> str:
            return sse({"id": rid, "object": chunk_obj, "created": created, "model": req.model, "choices": [ch], **more})

        async def stream():
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
                                       "choices": [], "usage": usage([ev.info])})
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        done = True
                        yield sse(event_error(ev).body())
                        yield "data: [DONE]\n\n"
                        return
            finally:
                if not done:  # the client went away: free its batch slot
                    handle.cancel()

        return _Stream(handle.cancel, stream(), media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def event_error(ev: Event) -> APIError:
        if ev.text == SHUTDOWN_MESSAGE:
            return APIError(503, ev.text, "server_error", code="server_shutting_down")
        return APIError(500, ev.text, "server_error")

    async def wait_all(request: Request, submitted: list) -> list[dict]:
        """The ``done`` infos of every submitted request, in order; all are cancelled as soon as
        the client disconnects or any of them fails."""
        infos: list[dict | None] = [None] * len(submitted)
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            for i, (handle, events) in enumerate(submitted):
                while infos[i] is None:
                    get = asyncio.ensure_future(events.get())
                    await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():
                        get.cancel()
                        raise APIError(499, "client disconnected", code="client_closed_request")
                    ev = get.result()
                    if ev.kind == "done":
                        infos[i] = ev.info
                    elif ev.kind == "error":
                        raise event_error(ev)
            return infos
        finally:
            gone.cancel()
            for (handle, _), info in zip(submitted, infos):
                if info is None:
                    handle.cancel()

    async def wait_disconnect(request: Request) -> None:
        """Returns when the client has gone (the body was read already, so the next ASGI
        message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, parse_chat, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, parse_completion, chat=False)

    return app


class _Stream(StreamingResponse):
    """A streaming response that calls ``on_close`` however it ends, also when the client left
    before the body started (the body generator's own ``finally`` would then never run)."""

    def __init__(self, on_close, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _uvicorn_server(app: FastAPI, grace_s: float, **config):
    """A uvicorn server whose first SIGTERM/SIGINT drains the engine: new requests get 503,
    in-flight ones have ``grace_s`` seconds to finish, then end with an error event and
    ``[DONE]``; uvicorn stops accepting connections at once and exits when they are closed
    (a second signal forces the exit)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.engine.drain(grace_s)
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, timeout_graceful_shutdown=grace_s + 5, **config))


class BackgroundServer:
    """Run ``app`` with uvicorn in a daemon thread on an already-bound loopback socket (port 0
    picks a free one): ``with BackgroundServer(app) as srv: srv.url``. For tests and embedding."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import socket

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = _uvicorn_server(app, 0.0, log_level=log_level)
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
        self.server.handle_exit(None, None)
        self.thread.join(10)
        self.sock.close()


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          shutdown_grace_s: float = 5.0) -> None:
    """Run ``app`` with uvicorn until SIGTERM/SIGINT (then drain, see ``_uvicorn_server``)."""
    _uvicorn_server(app, shutdown_grace_s, host=host, port=port, log_level=log_level).run()
