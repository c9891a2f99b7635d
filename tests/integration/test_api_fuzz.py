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
served = st.sampled_from([SERVED_INT8, SERVED_FP32])
words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30)

# --- valid bodies of every shape, with valid parameter values ------------------------------------------------
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": words})
valid_content = st.one_of(words, st.lists(text_part, min_size=1, max_size=3))
valid_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": valid_content},
                                      optional={"name": st.text(max_size=5)})
valid_common = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "top_k": st.sampled_from([-1, 1, 5, 50, 2**31 - 1]),
    "n": st.integers(1, 2), "max_tokens": st.integers(1, MAX_TOKENS), "stream": st.booleans(),
    "stop": st.one_of(words, st.lists(words, max_size=2)), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2), "user": st.text(max_size=5),
}
valid_chat = st.fixed_dictionaries(
    {"model": served, "messages": st.lists(valid_message, min_size=1, max_size=3)},
    optional={**valid_common, "max_completion_tokens": st.integers(1, MAX_TOKENS),
              "response_format": st.just({"type": "text"}), "tool_choice": st.just("none"),
              "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})})
token_ids = st.lists(st.integers(0, 49151), min_size=1, max_size=6)  # SmolLM2's vocabulary
valid_prompt = st.one_of(words, st.lists(words, min_size=1, max_size=2), token_ids, st.lists(token_ids, min_size=1, max_size=2))
valid_completion = st.fixed_dictionaries({"model": served, "prompt": valid_prompt},
                                         optional={**valid_common, "echo": st.booleans()})
valid_embedding = st.fixed_dictionaries({"model": served, "input": valid_prompt},
                                        optional={"encoding_format": st.sampled_from(["float", "base64"])})
VALID = {"/chat/completions": valid_chat, "/completions": valid_completion, "/embeddings": valid_embedding}
FIELDS = {"/chat/completions": ["model", "messages", *valid_common, "max_completion_tokens", "stream_options", "tools",
                                "tool_choice", "response_format", "seed", "logit_bias", "logprobs", "top_logprobs"],
          "/completions": ["model", "prompt", *valid_common, "echo", "suffix", "best_of", "logprobs", "seed"],
          "/embeddings": ["model", "input", "encoding_format", "dimensions"]}

# --- anything at all in one field of a valid body, or in the message and prompt shapes ---------------------
other_part = st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", "file", "video", ""]),
                                    "image_url": anything})
odd_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "tool", "robot", ""]), "content": st.one_of(
        st.lists(st.one_of(text_part, other_part, anything), max_size=3), anything)}),
    st.fixed_dictionaries({"role": st.just("user")}, optional={"content": anything, "tool_calls": anything}), anything)


@st.composite
def mutated(draw):
    path = draw(st.sampled_from(sorted(VALID)))
    body = dict(draw(VALID[path]))
    key = draw(st.sampled_from(FIELDS[path]))
    body[key] = draw(anything)
    if path == "/chat/completions" and draw(st.booleans()):
        body["messages"] = draw(st.lists(st.one_of(valid_message, odd_message), min_size=1, max_size=3))
    return path, body


request = st.one_of(
    *(st.tuples(st.just(path), strategy) for path, strategy in VALID.items()),
    mutated(), mutated(),
    st.tuples(st.sampled_from(sorted(VALID)), anything),
)


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
