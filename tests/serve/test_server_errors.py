"""Malformed requests get the right 4xx with an OpenAI-style JSON error, and the server keeps
serving afterwards."""
import json

import openai
import pytest
import requests

GOOD = {"model": "tiny-sb", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}


def _post(server, body, path="/v1/chat/completions", key="default", raw=False):
    headers = {"Content-Type": "application/json"}
    key = server.api_key if key == "default" else key
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if raw else json.dumps(body)
    return requests.post(server.url + path, data=data, headers=headers, timeout=60)


def _assert_error(r, status, code=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert "type" in err
    if code is not None:
        assert err["code"] == code


def _still_serving(server):
    r = _post(server, GOOD)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", "\"just a string\"".encode(), b"\xff\xfe"])
def test_malformed_json_is_400(server, raw):
    _assert_error(_post(server, raw, raw=True), 400, "invalid_json")
    _still_serving(server)


@pytest.mark.parametrize("field,value", [
    ("max_tokens", "ten"), ("max_tokens", 2.5), ("max_tokens", True), ("temperature", "hot"), ("temperature", True),
    ("top_p", [1]), ("seed", "x"), ("stream", "yes"), ("stop", 5), ("stop", ["ok", 3]), ("messages", "hi"),
    ("messages", []), ("messages", [{"role": "wizard", "content": "x"}]), ("messages", [{"role": "user", "content": 5}]),
    ("model", 7), ("n", 2), ("temperature", 3.0), ("top_p", 0), ("max_tokens", 0),
])
def test_wrong_types_and_values_are_400(server, field, value):
    _assert_error(_post(server, {**GOOD, field: value}), 400)
    _still_serving(server)


def test_missing_messages_and_prompt_are_400(server):
    _assert_error(_post(server, {"model": "tiny-sb"}), 400, "missing_required_parameter")
    _assert_error(_post(server, {"model": "tiny-sb"}, path="/v1/completions"), 400, "missing_required_parameter")
    _assert_error(_post(server, {"model": "tiny-sb", "prompt": {"a": 1}}, path="/v1/completions"), 400, "invalid_type")


def test_oversized_body_is_413_and_too_long_prompt_is_400(server):
    big = {**GOOD, "messages": [{"role": "user", "content": "x" * 20000}]}
    _assert_error(_post(server, big), 413, "request_too_large")
    long_prompt = {**GOOD, "messages": [{"role": "user", "content": "word " * 1000}]}  # < 8 KiB, > 300 tokens
    _assert_error(_post(server, long_prompt), 400, "context_length_exceeded")
    _assert_error(_post(server, {**GOOD, "max_tokens": 65}), 400, "max_tokens_exceeded")
    _still_serving(server)


def test_unknown_model_is_404(server, client):
    _assert_error(_post(server, {**GOOD, "model": "gpt-9"}), 404, "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=GOOD["messages"])
    _assert_error(requests.get(server.url + "/v1/nothing-here", headers={"Authorization": f"Bearer {server.api_key}"}), 404)
    _still_serving(server)


def test_api_key_missing_or_wrong_is_401(server):
    from openai import OpenAI

    _assert_error(_post(server, GOOD, key=None), 401, "missing_api_key")
    _assert_error(_post(server, GOOD, key="wrong"), 401, "invalid_api_key")
    _assert_error(requests.get(server.url + "/v1/models"), 401)
    bad = OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny-sb", messages=GOOD["messages"])
    # health and the page stay open; metrics, info and the tokenizer need the key too
    assert requests.get(server.url + "/health").status_code == 200
    assert requests.get(server.url + "/").status_code == 200
    for path in ("/metrics", "/info", "/tokenizer_info"):
        _assert_error(requests.get(server.url + path), 401, "missing_api_key")
    _assert_error(_post(server, {"prompt": "x"}, path="/tokenize", key=None), 401, "missing_api_key")
    _still_serving(server)
    auth = {"Authorization": f"Bearer {server.api_key}"}
    assert 'status="401"' in requests.get(server.url + "/metrics", headers=auth).text
