"""A bounded property-based fuzz of the API (hypothesis) on the shared served bundle: JSON bodies of random shapes
and types for /v1/chat/completions, /v1/completions and /v1/embeddings. Every answer is a 2xx, or a 4xx in
OpenAI's error envelope; never a 5xx, never an error event inside a 200 stream; the server still serves after.

Bounded: about 200 examples, answers capped at a few tokens, and a wall-clock budget after which the remaining
examples are not sent.
"""
from __future__ import annotations

import collections
import json
import sys
import time

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import API_KEYS, SERVED_FP32, SERVED_INT8

BUDGET_S = 110
MAX_TOKENS = 3
EXAMPLES = 200

scalar = st.one_of(st.none(), st.booleans(), st.integers(-3, 70000), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=12))
anything = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                           max_size=3), max_leaves=6)
model = st.one_of(st.sampled_from([SERVED_INT8, SERVED_FP32]), st.sampled_from([SERVED_INT8, SERVED_FP32]), anything)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=20), anything)})
other_part = st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", "file", "video", ""]),
                                    "image_url": anything})
content = st.one_of(st.text(max_size=40), st.lists(st.one_of(text_part, other_part, anything), max_size=3), anything)
message = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"]),
                                           "content": content}),
                    st.fixed_dictionaries({"role": st.just("user")}, optional={"content": content, "name": anything,
                                                                              "tool_calls": anything}),
                    anything)
number = st.one_of(st.floats(-3, 3), st.integers(-3, 12), anything)
common = {
    "temperature": number, "top_p": number, "top_k": number, "n": number, "max_tokens": number, "stop": st.one_of(
        st.text(max_size=4), st.lists(st.text(max_size=4), max_size=3), anything),
    "stream": st.one_of(st.booleans(), anything), "presence_penalty": number, "frequency_penalty": number,
    "repetition_penalty": number, "seed": anything, "logit_bias": anything, "user": anything,
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), anything),
}
chat = st.fixed_dictionaries({"model": model, "messages": st.one_of(st.lists(message, max_size=3), anything)},
                             optional={**common, "max_completion_tokens": number, "tools": anything,
                                       "tool_choice": anything, "response_format": st.one_of(
                                           st.just({"type": "text"}), st.just({"type": "json_object"}), anything),
                                       "logprobs": anything, "top_logprobs": anything})
tokens = st.lists(st.integers(-2, 50000), max_size=6)
prompt = st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10), max_size=2), tokens,
                   st.lists(tokens, max_size=2), anything)
completion = st.fixed_dictionaries({"model": model, "prompt": prompt},
                                   optional={**common, "echo": anything, "suffix": anything, "best_of": anything,
                                             "logprobs": anything})
embedding = st.fixed_dictionaries({"model": model, "input": prompt},
                                  optional={"encoding_format": st.one_of(st.sampled_from(["float", "base64"]), anything),
                                            "dimensions": anything, "user": anything})
request = st.one_of(st.tuples(st.just("/chat/completions"), chat), st.tuples(st.just("/completions"), completion),
                    st.tuples(st.just("/embeddings"), embedding),
                    st.tuples(st.sampled_from(["/chat/completions", "/completions", "/embeddings"]), anything))


def capped(path: str, body):
    """Keep every answer short: max_tokens at most MAX_TOKENS, n at most 2 (invalid values are left alone)."""
    if not isinstance(body, dict) or path == "/embeddings":
        return body
    body = dict(body)
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None and key in body:
            body[key] = MAX_TOKENS
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and value > MAX_TOKENS:
            body[key] = MAX_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and 2 < n <= 8:
        body["n"] = 2
    return body


def test_random_bodies_never_get_a_5xx_and_the_server_survives(served_bundle):
    url = served_bundle["api"]
    headers = {"Authorization": f"Bearer {API_KEYS[0]}", "Content-Type": "application/json"}
    started = time.monotonic()
    seen: collections.Counter = collections.Counter()
    failures: list[str] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                     HealthCheck.large_base_example])
    @given(request)
    def one(case):
        if time.monotonic() - started > BUDGET_S:
            seen["not sent (budget)"] += 1
            return
        path, body = case
        body = capped(path, body)
        data = json.dumps(body, allow_nan=True)  # NaN/Infinity too: the API must refuse them with a 400
        r = requests.post(url + path, data=data, headers=headers, timeout=120, stream=True)
        seen[r.status_code] += 1
        if r.status_code >= 500:
            failures.append(f"{r.status_code} {path} {data[:300]} -> {r.text[:300]}")
            return
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], (data[:300], r.text[:300])
            return
        if r.headers["content-type"].startswith("text/event-stream"):
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("data: ") and line != "data: [DONE]" and "error" in json.loads(line[6:]):
                    failures.append(f"error event {path} {data[:300]} -> {line[:300]}")
        else:
            assert r.json()["object"] in ("chat.completion", "text_completion", "list")

    one()
    elapsed = time.monotonic() - started
    sys.__stderr__.write(f"\nAPI fuzz: {sum(seen.values())} examples in {elapsed:.0f} s: {dict(seen)}\n")
    assert not failures, "\n".join(failures[:10])
    assert sum(v for k, v in seen.items() if isinstance(k, int)) >= 100, seen
    health = requests.get(url.removesuffix("/v1") + "/health", timeout=10)
    assert health.status_code == 200, health.text
    r = requests.post(url + "/chat/completions", headers=headers, timeout=120, json={
        "model": SERVED_INT8, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
