"""The OpenAI-style API, proven with the official openai client against the bundle under supervisord."""
from __future__ import annotations

import concurrent.futures
import json
import pathlib

import openai
import pytest
import requests
from openai import OpenAI

from tests.conftest import API_KEYS, SERVED_FP32, SERVED_INT8

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(served_bundle) -> OpenAI:
    return OpenAI(base_url=served_bundle["api"], api_key=API_KEYS[0], max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def post(served_bundle):
    """Raw POST with a valid key: for inputs the openai client would refuse to send."""
    def _post(path, body=None, data=None, headers=None, key=API_KEYS[1]):
        h = {"Authorization": f"Bearer {key}"} if key else {}
        h.update(headers or {})
        return requests.post(served_bundle["api"] + path, json=body, data=data, headers=h, timeout=180)
    return _post


def test_list_models(client):
    assert sorted(m.id for m in client.models.list().data) == sorted([SERVED_INT8, SERVED_FP32])


@pytest.mark.parametrize("model", [SERVED_INT8, SERVED_FP32])
def test_chat_completion(client, model):
    r = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 16


def test_chat_streaming_delivers_deltas_then_the_end(client):
    stream = client.chat.completions.create(
        model=SERVED_INT8, messages=[{"role": "user", "content": "Write two sentences about the sea."}],
        temperature=0, max_tokens=40, stream=True)
    chunks = list(stream)
    contents = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(contents) >= 3, "answer should arrive in several deltas"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_max_tokens_temperature_top_p_n(client):
    r = client.chat.completions.create(model=SERVED_FP32, messages=QUESTION, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client.chat.completions.create(model=SERVED_FP32, messages=QUESTION, max_tokens=8,
                                       temperature=1.0, top_p=0.9, n=2)
    assert [c.index for c in r.choices] == [0, 1] and all(c.message.content for c in r.choices)


def test_user_stop_ends_the_answer_and_default_stop_still_applies(client):
    r = client.chat.completions.create(model=SERVED_INT8, messages=QUESTION, temperature=0, max_tokens=16, stop=["Paris"])
    assert r.choices[0].message.content.rstrip().endswith("is") and r.choices[0].finish_reason == "stop"
    # A user stop string must not disable the template's own stop (<|im_end|>): the answer still ends by itself.
    r = client.chat.completions.create(model=SERVED_INT8, messages=QUESTION, temperature=0, max_tokens=40, stop=["zebra"])
    assert r.choices[0].finish_reason == "stop" and "<|im_end|>" not in r.choices[0].message.content


def test_text_completions_streaming_and_not(client):
    r = client.completions.create(model=SERVED_FP32, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.choices[0].text.strip() and r.choices[0].finish_reason in ("stop", "length")
    parts = [c.choices[0].text for c in client.completions.create(
        model=SERVED_FP32, prompt="One, two, three,", max_tokens=8, temperature=0, stream=True)]
    assert len([p for p in parts if p]) >= 2


def test_chinese_survives_the_round_trip(client):
    prompt = "中文测试：北京是中国的首都。"
    r = client.completions.create(model=SERVED_INT8, prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text.startswith(prompt)
    r = client.chat.completions.create(model=SERVED_INT8, messages=[{"role": "user", "content": "用中文说：你好"}],
                                       max_tokens=12, temperature=0)
    assert r.choices[0].message.content and "\\u" not in r.choices[0].message.content
    stream = client.chat.completions.create(model=SERVED_INT8, messages=[{"role": "user", "content": "你好"}],
                                            max_tokens=12, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text and "\ufffd" not in text


def test_embeddings(client):
    r = client.embeddings.create(model=SERVED_FP32, input=["hello world", "你好，世界"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 576 and r.data[0].embedding != r.data[1].embedding


# --- API keys -----------------------------------------------------------------------------------

def test_missing_key_gets_401_with_a_clear_message(served_bundle):
    r = requests.get(served_bundle["api"] + "/models", timeout=10)
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        OpenAI(base_url=served_bundle["api"], api_key="sk-wrong", max_retries=0).models.list()


def test_every_configured_key_works_and_keys_never_reach_logs(served_bundle, client):
    for key in API_KEYS:
        OpenAI(base_url=served_bundle["api"], api_key=key, max_retries=0).models.list()
    logs = pathlib.Path(served_bundle["var"]) / "logs"
    text = "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file())
    text += (pathlib.Path(served_bundle["var"]) / "run" / "supervisord.conf").read_text()
    assert text and not any(key in text for key in API_KEYS)


# --- bad input: 4xx JSON naming the problem, never 5xx, and the server keeps serving ------------

BAD = {
    "unknown model": ("/chat/completions", {"model": "gpt-9", "messages": QUESTION}, 400, "available models: smol-fp32, smol-int8"),
    "empty messages": ("/chat/completions", {"model": SERVED_INT8, "messages": []}, 400, "at least one message"),
    "messages wrong type": ("/chat/completions", {"model": SERVED_INT8, "messages": 123}, 400, "messages"),
    "message without content": ("/chat/completions", {"model": SERVED_INT8, "messages": [{"role": "user"}]}, 400, "messages[0] has no 'content'"),
    "unknown role": ("/chat/completions", {"model": SERVED_INT8, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    "temperature wrong type": ("/chat/completions", {"model": SERVED_INT8, "messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
    "negative max_tokens": ("/chat/completions", {"model": SERVED_INT8, "messages": QUESTION, "max_tokens": -5}, 400, "max_tokens"),
    "huge max_tokens": ("/chat/completions", {"model": SERVED_INT8, "messages": QUESTION, "max_tokens": 10**9}, 400, "max_tokens=1000000000 is too large"),
    "temperature too high": ("/chat/completions", {"model": SERVED_INT8, "messages": QUESTION, "temperature": 5}, 400, "temperature"),
    "top_p out of range": ("/chat/completions", {"model": SERVED_INT8, "messages": QUESTION, "top_p": 1.5}, 400, "top_p"),
    "n too large": ("/chat/completions", {"model": SERVED_INT8, "messages": QUESTION, "n": 100}, 400, "'n'"),
    "prompt longer than context": ("/chat/completions", {"model": SERVED_INT8, "messages": [{"role": "user", "content": "hello " * 9000}]}, 400, "maximum context length is 8192"),
    "completion prompt too long": ("/completions", {"model": SERVED_FP32, "prompt": "hello " * 9000}, 400, "maximum context length"),
    "empty embedding input": ("/embeddings", {"model": SERVED_FP32, "input": []}, 400, "must not be empty"),
}


@pytest.mark.parametrize("case", BAD.keys())
def test_bad_input_gets_4xx_naming_the_problem(post, case):
    path, body, status, fragment = BAD[case]
    r = post(path, body)
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert fragment in r.json()["message"], r.text[:300]


def test_malformed_json_gets_400(post):
    r = post("/chat/completions", data=b'{"model": "x", "messages": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.text


def test_oversized_body_gets_413(post):
    r = post("/chat/completions", data=json.dumps({"model": SERVED_INT8, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}),
             headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["message"]


def test_server_still_serves_after_bad_input(client, served_bundle):
    assert "Paris" in client.chat.completions.create(model=SERVED_INT8, messages=QUESTION, temperature=0, max_tokens=16).choices[0].message.content
    status = requests.post(served_bundle["controller"] + "/list_models", timeout=5).json()["models"]
    assert sorted(status) == sorted([SERVED_INT8, SERVED_FP32])


# --- load --------------------------------------------------------------------------------------

def test_eight_concurrent_clients_all_get_complete_answers(served_bundle):
    def one_client(i: int) -> list[str]:
        c = OpenAI(base_url=served_bundle["api"], api_key=API_KEYS[i % 2], max_retries=0, timeout=300)
        model = (SERVED_INT8, SERVED_FP32)[i % 2]
        results = []
        for j in range(3):
            if (i + j) % 2:
                stream = c.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0, stream=True)
                chunks = list(stream)
                results.append((chunks[-1].choices[0].finish_reason, "".join(ch.choices[0].delta.content or "" for ch in chunks)))
            else:
                r = c.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
                results.append((r.choices[0].finish_reason, r.choices[0].message.content))
        return results

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        all_results = [r for rs in pool.map(one_client, range(8)) for r in rs]
    assert len(all_results) == 24
    assert all(reason in ("stop", "length") and "Paris" in text for reason, text in all_results), all_results
