"""The checks every HTTP request passes before a route sees it, as a pure ASGI middleware.

Why pure ASGI and not ``BaseHTTPMiddleware``: the latter wraps ``receive``, so a route could not
see its client's disconnect and a non-streaming generation ran to the end for nobody. Here
``receive`` goes through untouched.

In order:
1. ``Host`` must be in the allow-list (default: loopback names): a page on another site that
   resolves its own name to 127.0.0.1 (DNS rebinding) cannot read replies.
2. With an API key, every route but ``/`` (the page) and ``/health`` needs
   ``Authorization: Bearer KEY`` (``/metrics``, ``/info`` and the tokenizer routes included).
3. ``POST`` needs ``Content-Type: application/json``: a cross-site ``text/plain`` form or
   ``no-cors`` fetch (which browsers send without a preflight) is refused before generating.
Every answer is counted in the metrics under its route template (``other`` for unknown paths).
"""
from __future__ import annotations

import hmac
import json

from spikingbrain.serve.protocol import APIError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
PUBLIC_PATHS = ("/", "/health")


def host_name(value: str) -> str:
    """``[::1]:8000`` -> ``::1``; ``Example.COM:80`` -> ``example.com``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Gate:
    def __init__(self, app, api_key: str | None, allowed_hosts, metrics, routes: set[str]) -> None:
        self.app = app
        self.api_key = api_key
        hosts = [h.strip().lower() for h in allowed_hosts]
        self.any_host = "*" in hosts
        self.hosts = {host_name(h) for h in hosts if h != "*"}
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        label = path if path in self.routes else "other"
        status = {"code": 0}

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        error = self._check(scope, path)
        try:
            if error is not None:
                await _send_error(counting_send, error)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            if status["code"]:
                self.metrics.count_request(label, status["code"])

    def _check(self, scope, path: str) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self.any_host and host_name(headers.get("host", "")) not in self.hosts:
            return APIError(400, "this Host is not allowed (start the server with --allowed-hosts to add it)",
                            code="invalid_host")
        if self.api_key and path not in PUBLIC_PATHS:
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not given:
                return APIError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY'", code="missing_api_key")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return APIError(401, "incorrect API key", code="invalid_api_key")
        if scope.get("method") == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return APIError(415, "POST bodies must be sent with 'Content-Type: application/json'",
                                code="unsupported_media_type")
        return None


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
