"""OpenAI request bodies -> validated generation requests, with OpenAI-style errors.

Every problem becomes an ``APIError`` carrying the HTTP status and the JSON body OpenAI clients
expect: ``{"error": {"message", "type", "param", "code"}}``. Unknown fields are ignored (clients
send many optional ones); supported fields are type-checked strictly (``true`` is not a number).

Extensions beyond OpenAI's fields: ``top_k`` and ``repetition_penalty``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from spikingbrain.errors import SpikingBrainError
from spikingbrain.serve.sampling import SamplingParams

ROLES = ("system", "user", "assistant", "developer", "tool")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """max_request_bytes: HTTP body size (413 above). max_prompt_tokens: prompt length (400
    ``context_length_exceeded`` above). max_tokens_cap: largest ``max_tokens`` a request may ask
    for (400 above); also the default when a request gives none."""

    max_request_bytes: int = 1 << 20
    max_prompt_tokens: int = 32768
    max_tokens_cap: int = 1024


@dataclass
class GenerationRequest:
    model: str
    stream: bool
    include_usage: bool
    params: SamplingParams
    messages: list[dict] | None = None  # chat
    prompt: str | list[int] | None = None  # completions


def parse_body(raw: bytes, limits: Limits) -> dict:
    if len(raw) > limits.max_request_bytes:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {limits.max_request_bytes}",
                       code="request_too_large")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _get(body: dict, name: str, check, what: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", param=name, code="invalid_type")
    return value


def _sampling(body: dict, limits: Limits) -> tuple[SamplingParams, bool, bool]:
    max_tokens = _get(body, "max_completion_tokens", _is_int, "an integer")
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", _is_int, "an integer", limits.max_tokens_cap)
    if max_tokens < 1:
        raise APIError(400, f"'max_tokens' must be >= 1, got {max_tokens}", param="max_tokens")
    if max_tokens > limits.max_tokens_cap:
        raise APIError(400, f"'max_tokens' is {max_tokens}; this server allows at most {limits.max_tokens_cap}",
                       param="max_tokens", code="max_tokens_exceeded")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > 16:
        raise APIError(400, "'stop' must be a string or a list of at most 16 strings", param="stop", code="invalid_type")
    n = _get(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if _get(body, name, _is_number, "a number", 0) != 0:
            raise APIError(400, f"'{name}' is not supported (use 'repetition_penalty')", param=name)
    if body.get("logprobs") not in (None, False, 0):
        raise APIError(400, "'logprobs' is not supported", param="logprobs")
    stream = _get(body, "stream", lambda x: isinstance(x, bool), "a boolean", False)
    opts = _get(body, "stream_options", lambda x: isinstance(x, dict), "an object", {})
    include_usage = _get(opts, "include_usage", lambda x: isinstance(x, bool), "a boolean", False)
    try:
        params = SamplingParams(
            temperature=float(_get(body, "temperature", _is_number, "a number", 1.0)),
            top_p=float(_get(body, "top_p", _is_number, "a number", 1.0)),
            top_k=_get(body, "top_k", _is_int, "an integer", 0),
            repetition_penalty=float(_get(body, "repetition_penalty", _is_number, "a number", 1.0)),
            seed=_get(body, "seed", _is_int, "an integer"),
            max_new_tokens=max_tokens,
            stop=stop,
        )
    except SpikingBrainError as e:
        raise APIError(400, str(e)) from None
    if params.temperature > 2.0:
        raise APIError(400, f"'temperature' must be in [0, 2], got {params.temperature}", param="temperature")
    return params, stream, include_usage


def _model(body: dict, served: list[str]) -> str:
    model = _get(body, "model", lambda x: isinstance(x, str), "a string", served[0])
    if model not in served:
        raise APIError(404, f"the model '{model}' does not exist; this server serves {', '.join(served)}",
                       type_="invalid_request_error", param="model", code="model_not_found")
    return model


def _content_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content", code="invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param=f"messages[{i}].content", code="invalid_type")


def parse_chat(body: dict, limits: Limits, served: list[str]) -> GenerationRequest:
    model = _model(body, served)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages",
                       code="invalid_type" if messages is not None else "missing_required_parameter")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] must be an object with 'role' in {list(ROLES)}", param=f"messages[{i}]")
        clean.append({"role": m["role"], "content": _content_text(m.get("content"), i)})
    params, stream, include_usage = _sampling(body, limits)
    return GenerationRequest(model, stream, include_usage, params, messages=clean)


def parse_completion(body: dict, limits: Limits, served: list[str]) -> GenerationRequest:
    model = _model(body, served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    ok = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt))
    if not ok:
        raise APIError(400, "'prompt' must be a string (or one list of token ids)", param="prompt",
                       code="invalid_type" if prompt is not None else "missing_required_parameter")
    params, stream, include_usage = _sampling(body, limits)
    return GenerationRequest(model, stream, include_usage, params, prompt=prompt)
