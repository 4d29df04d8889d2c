"""OpenAI request bodies -> validated generation requests, with OpenAI-style errors.

Every problem becomes an ``APIError`` carrying the HTTP status and the JSON body OpenAI clients
expect: ``{"error": {"message", "type", "param", "code"}}``. Unknown fields are ignored (clients
send many optional ones), except the OpenAI features this server does not implement (tools,
functions, structured output, ...): those are a 400 naming the field rather than an answer that
silently ignored what was asked. Supported fields are type-checked strictly (``true`` is not a
number); NaN/Infinity, lone UTF-16 surrogates and JSON nested deeper than ``MAX_DEPTH`` are 400s.

Extensions beyond OpenAI's fields: ``top_k`` and ``repetition_penalty``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from spikingbrain.errors import SpikingBrainError
from spikingbrain.serve.sampling import MAX_LOGPROBS, SEED_MAX, SEED_MIN, SamplingParams

ROLES = ("system", "user", "assistant", "developer", "tool")
MAX_DEPTH = 32  # OpenAI bodies nest about 6 deep; deeper ones are only ever attacks
MAX_PROMPTS = 32  # prompts in one /v1/completions request

# fields of OpenAI's API that change what the answer must be; accepted only at their "off" value
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}), "suffix": (None, ""), "logit_bias": (None, {}),
    "best_of": (None, 1), "parallel_tool_calls": (None, False, True), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "web_search_options": (None,), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """max_request_bytes: HTTP body size (413 above). max_prompt_tokens: prompt length (400
    ``context_length_exceeded`` above; None: the model's ``max_position_embeddings``).
    max_tokens_cap: largest ``max_tokens`` a request may ask for (400 above); also the default
    when a request gives none. body_timeout_s: a request body not received in full by then is a
    408 (a half-sent body must not hold a connection forever)."""

    max_request_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_tokens_cap: int = 1024
    body_timeout_s: float = 30.0


@dataclass
class GenerationRequest:
    model: str
    stream: bool
    include_usage: bool
    params: SamplingParams
    messages: list[dict] | None = None  # chat
    prompts: list | None = None  # completions: each a string or a list of token ids
    echo: bool = False  # completions: the answer starts with the prompt (with its logprobs)
    logprobs: int | None = None  # top alternatives to report per token (None: no logprobs)


def parse_body(raw: bytes, limits: Limits) -> dict:
    if len(raw) > limits.max_request_bytes:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {limits.max_request_bytes}",
                       code="request_too_large")
    if _nesting(raw) > MAX_DEPTH:  # before json.loads: a deep body would raise RecursionError there
        raise APIError(400, f"request body is nested deeper than {MAX_DEPTH} levels", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    _check_strings(body)
    return body


def _nesting(raw: bytes) -> int:
    """Deepest ``[``/``{`` nesting of a JSON text (brackets inside strings skipped); a linear scan."""
    depth = best = 0
    in_str = escaped = False
    for b in raw:
        if in_str:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            best = max(best, depth)
        elif b in (0x5D, 0x7D):
            depth -= 1
    return best


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_strings(body) -> None:
    """Every string must be valid Unicode text: a lone surrogate (``"\\ud800"``) cannot be
    encoded as UTF-8, so it would break the tokenizer deep inside."""
    stack = [body]
    while stack:
        x = stack.pop()
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
        for k, v in items:
            for s in (k, v):
                if isinstance(s, str):
                    try:
                        s.encode("utf-8")
                    except UnicodeEncodeError:
                        raise APIError(400, "request body contains a lone UTF-16 surrogate (not valid Unicode text)",
                                       code="invalid_json") from None
            if isinstance(v, (dict, list)):
                stack.append(v)


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


def _unsupported(body: dict) -> None:
    for name, off in UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def _sampling(body: dict, limits: Limits, logprobs: int | None = None,
              prompt_logprobs: int | None = None) -> tuple[SamplingParams, bool, bool]:
    _unsupported(body)
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
    stream = _get(body, "stream", lambda x: isinstance(x, bool), "a boolean", False)
    if stream and logprobs is not None:
        raise APIError(400, "logprobs are not supported with 'stream'", param="logprobs", code="unsupported_parameter")
    seed = _get(body, "seed", _is_int, "an integer")
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise APIError(400, f"'seed' must be in [-2**63, 2**64 - 1], got {seed}", param="seed")
    opts = _get(body, "stream_options", lambda x: isinstance(x, dict), "an object", {})
    include_usage = _get(opts, "include_usage", lambda x: isinstance(x, bool), "a boolean", False)
    try:
        params = SamplingParams(
            temperature=float(_get(body, "temperature", _is_number, "a number", 1.0)),
            top_p=float(_get(body, "top_p", _is_number, "a number", 1.0)),
            top_k=_get(body, "top_k", _is_int, "an integer", 0),
            repetition_penalty=float(_get(body, "repetition_penalty", _is_number, "a number", 1.0)),
            seed=seed,
            max_new_tokens=max_tokens,
            stop=stop,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
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
        content = m.get("content")
        if content is None and m["role"] == "assistant" and m.get("tool_calls"):
            content = ""  # an earlier turn that called tools: history only, its text is empty
        clean.append({"role": m["role"], "content": _content_text(content, i)})
    if body.get("echo"):
        raise APIError(400, "'echo' is not supported on chat completions (use /v1/completions)", param="echo",
                       code="unsupported_parameter")
    logprobs = None
    if _get(body, "logprobs", lambda x: isinstance(x, bool), "a boolean", False):
        logprobs = _get(body, "top_logprobs", _is_int, "an integer", 0)
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"'top_logprobs' must be in [0, {MAX_LOGPROBS}]", param="top_logprobs")
    elif body.get("top_logprobs") is not None:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    params, stream, include_usage = _sampling(body, limits, logprobs)
    return GenerationRequest(model, stream, include_usage, params, messages=clean, logprobs=logprobs)


def _prompts(prompt) -> list | None:
    """OpenAI's four prompt shapes -> a list of prompts (strings or token-id lists)."""
    def ids(x):
        return isinstance(x, list) and len(x) > 0 and all(_is_int(t) for t in x)

    if isinstance(prompt, str) or ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p) for p in prompt):
        return prompt
    return None


def parse_completion(body: dict, limits: Limits, served: list[str]) -> GenerationRequest:
    model = _model(body, served)
    prompt = body.get("prompt")
    prompts = _prompts(prompt)
    if prompts is None:
        raise APIError(400, "'prompt' must be a string, a list of token ids, or a list of either", param="prompt",
                       code="invalid_type" if prompt is not None else "missing_required_parameter")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    echo = _get(body, "echo", lambda x: isinstance(x, bool), "a boolean", False)
    logprobs = _get(body, "logprobs", _is_int, "an integer")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"'logprobs' must be in [0, {MAX_LOGPROBS}]", param="logprobs")
    params, stream, include_usage = _sampling(body, limits, logprobs, logprobs if echo and logprobs is not None else None)
    if stream and (len(prompts) > 1 or echo):
        raise APIError(400, "'stream' supports one prompt without 'echo'", param="stream", code="unsupported_parameter")
    return GenerationRequest(model, stream, include_usage, params, prompts=prompts, echo=echo, logprobs=logprobs)
