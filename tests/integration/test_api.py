"""The OpenAI-style API, proven with the official openai client against the bundle under supervisord."""
from __future__ import annotations

import concurrent.futures
import json
import pathlib
import sys
import time

import openai
import pytest
import requests
from openai import OpenAI

from tests.conftest import API_KEYS, SERVED_FP32, SERVED_INT8
from tests.helpers import LONG_STORY, NEVER_ENDS, rpc, wait_for

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


@pytest.mark.parametrize("served", [SERVED_INT8, SERVED_FP32])
def test_the_ends_of_the_sampling_ranges_are_served_not_refused(client, served):
    """What the API accepts the worker serves: top_p 0 is its limit (only the most likely token is left, so the answer
    is the greedy one), a top_k beyond the vocabulary is no top-k at all."""
    greedy = client.chat.completions.create(model=served, messages=QUESTION, max_tokens=8, temperature=0)
    r = client.chat.completions.create(model=served, messages=QUESTION, max_tokens=8, temperature=1.0, top_p=0)
    assert r.choices[0].message.content == greedy.choices[0].message.content
    r = client.chat.completions.create(model=served, messages=QUESTION, max_tokens=4, temperature=1.0,
                                       extra_body={"top_k": 2**31 - 1})
    assert r.choices[0].message.content


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
    r = client.completions.create(model=SERVED_FP32, prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text.startswith(prompt)
    # The INT8 model runs on neural-speed, whose graph takes only BOS-first sequences: a plain prompt is
    # evaluated after the BOS token, and counted as the client sent it
    fp32 = client.completions.create(model=SERVED_FP32, prompt=prompt, max_tokens=4, temperature=0)
    int8 = client.completions.create(model=SERVED_INT8, prompt=prompt, max_tokens=4, temperature=0)
    assert int8.choices[0].text and int8.usage.prompt_tokens == fp32.usage.prompt_tokens
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
    "unknown model": ("/chat/completions", {"model": "gpt-9", "messages": QUESTION}, 404, "available models: smol-fp32, smol-int8"),
    "unknown embedding model": ("/embeddings", {"model": "text-embedding-3-small", "input": "x"}, 404, "available models"),
    "string messages": ("/chat/completions", {"model": SERVED_INT8, "messages": "What is the capital of France?"}, 400, "not a string"),
    "image content part": ("/chat/completions", {"model": SERVED_INT8, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]}]},
        400, "image_url content is not supported"),
    "content not text": ("/chat/completions", {"model": SERVED_INT8, "messages": [{"role": "user", "content": {"a": 1}}]}, 400, "messages[0].content"),
    "completion prompt [{}]": ("/completions", {"model": SERVED_FP32, "prompt": [{}]}, 400, "prompt[0]"),
    "completion prompt [null]": ("/completions", {"model": SERVED_FP32, "prompt": [None]}, 400, "prompt[0]"),
    "completion prompt empty list": ("/completions", {"model": SERVED_FP32, "prompt": []}, 400, "prompt must not be empty"),
    "completion prompt empty string": ("/completions", {"model": SERVED_FP32, "prompt": ""}, 400, "prompt must not be empty"),
    "completion token id out of vocabulary": ("/completions", {"model": SERVED_FP32, "prompt": [1, 10**7]}, 400, "prompt"),
    "embedding input [null]": ("/embeddings", {"model": SERVED_FP32, "input": [None]}, 400, "input[0]"),
    "embedding input [{}]": ("/embeddings", {"model": SERVED_FP32, "input": [{}]}, 400, "input[0]"),
    "presence_penalty out of range": ("/chat/completions", {"model": SERVED_INT8, "messages": QUESTION, "presence_penalty": 3}, 400, "'presence_penalty'"),
    "frequency_penalty out of range": ("/chat/completions", {"model": SERVED_INT8, "messages": QUESTION, "frequency_penalty": -2.5}, 400, "'frequency_penalty'"),
    "stream_options without stream": ("/chat/completions", {"model": SERVED_INT8, "messages": QUESTION, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    "echo of token ids": ("/completions", {"model": SERVED_FP32, "prompt": [1, 2, 3], "echo": True}, 400, "echo"),
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
    assert_envelope(r.json(), status)


def assert_envelope(body: dict, status: int) -> None:
    """OpenAI's error envelope, plus FastChat's top-level fields."""
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str) and err["code"]
    assert body["object"] == "error" and body["message"] == err["message"] and body["code"] == err["code"]
    if status == 400:
        assert err["type"] == "invalid_request_error"


def test_malformed_json_gets_400(post):
    r = post("/chat/completions", data=b'{"model": "x", "messages": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.text
    assert_envelope(r.json(), 400)
    assert r.json()["error"]["code"] == "invalid_json"


def test_oversized_body_gets_413(post):
    r = post("/chat/completions", data=json.dumps({"model": SERVED_INT8, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}),
             headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["message"]
    assert_envelope(r.json(), 413)


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


def test_int8_requests_at_once_decode_together_and_answer_as_each_alone(client, served_bundle):
    """The INT8 worker (neural-speed's llama graph, KV cache slots) batches concurrent requests: each greedy answer
    is token for token what the request gets alone, and its batcher's widest step held more than one."""
    questions = ["What is the capital of France?", "Name three colours.", "Write one sentence about the sea.",
                 "What is 2+2?"]

    def ask(question):
        r = client.chat.completions.create(model=SERVED_INT8, messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=24)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    alone = [ask(q) for q in questions]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone
    worker = requests.post(served_bundle["controller"] + "/get_worker_address", json={"model": SERVED_INT8},
                           timeout=10).json()["address"]
    details = requests.post(worker + "/model_details", timeout=10).json()
    assert details["batching"]["mode"] == "continuous batching" and details["batching"]["kv_cache_slots"] == 8
    assert details["batching"]["widest_step"] >= 2, details


# --- every OpenAI input shape: 200 with the right result, or a 4xx naming the problem ----------------------------

def test_content_as_a_list_of_text_parts(client):
    as_string = client.chat.completions.create(model=SERVED_INT8, messages=QUESTION, temperature=0, max_tokens=16)
    as_parts = client.chat.completions.create(
        model=SERVED_INT8, temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]}])
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    assert "Paris" in as_parts.choices[0].message.content
    two = client.chat.completions.create(
        model=SERVED_INT8, temperature=0, max_tokens=8,
        messages=[{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
                  {"role": "user", "content": [{"type": "text", "text": "Name a colour."}, {"type": "text", "text": "Just one."}]}])
    assert two.choices[0].message.content


def test_image_parts_are_refused_as_not_supported(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SERVED_INT8, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    assert info.value.status_code == 400 and "not supported" in info.value.message
    assert info.value.param == "messages[0].content[1]" and info.value.code == "unsupported_content"


def test_unknown_model_is_404_listing_the_served_ones(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=4)
    assert "available models: smol-fp32, smol-int8" in info.value.message and info.value.code == "model_not_found"


def test_an_unsupported_parameter_is_400_naming_it(client):
    """End to end through the official client; each parameter's refusal: tests/unit/test_api_policy.py."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SERVED_INT8, messages=QUESTION, max_tokens=4,
                                       prediction={"type": "content", "content": "x"})
    assert info.value.param == "prediction" and "prediction" in info.value.message, info.value.message


def test_presence_and_frequency_penalties_in_range_are_served(client):
    r = client.chat.completions.create(model=SERVED_FP32, messages=QUESTION, max_tokens=8, temperature=0,
                                       presence_penalty=1.5, frequency_penalty=-1.0)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0


def test_max_completion_tokens_is_honoured(client):
    r = client.chat.completions.create(model=SERVED_FP32, messages=QUESTION, temperature=0, max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_usage_is_not_multiplied_by_n(client):
    one = client.chat.completions.create(model=SERVED_FP32, messages=QUESTION, max_tokens=3, temperature=0)
    two = client.chat.completions.create(model=SERVED_FP32, messages=QUESTION, max_tokens=3, temperature=0, n=2)
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    assert two.usage.completion_tokens == 6 and two.usage.total_tokens == one.usage.prompt_tokens + 6


def test_stream_chunks_carry_object_and_created(served_bundle):
    r = requests.post(served_bundle["api"] + "/chat/completions", stream=True, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEYS[0]}"},
                      json={"model": SERVED_INT8, "messages": QUESTION, "max_tokens": 8, "temperature": 0, "stream": True})
    assert r.status_code == 200
    data = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len(chunks) >= 3
    assert all(c["object"] == "chat.completion.chunk" and isinstance(c["created"], int) and c["created"] > 0
               and c["id"] == chunks[0]["id"] and c["model"] == SERVED_INT8 for c in chunks)
    r = requests.post(served_bundle["api"] + "/completions", stream=True, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEYS[0]}"},
                      json={"model": SERVED_FP32, "prompt": "One, two,", "max_tokens": 4, "stream": True})
    chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks and all(c["object"] == "text_completion" and c["created"] > 0 for c in chunks)


def test_stream_include_usage(client):
    chunks = list(client.chat.completions.create(model=SERVED_INT8, messages=QUESTION, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    plain = client.chat.completions.create(model=SERVED_INT8, messages=QUESTION, max_tokens=6, temperature=0)
    assert text == plain.choices[0].message.content
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (plain.usage.prompt_tokens,
                                                                       plain.usage.completion_tokens)
    completion_chunks = list(client.completions.create(model=SERVED_FP32, prompt="One, two,", max_tokens=3, stream=True,
                                                       stream_options={"include_usage": True}))
    assert completion_chunks[-1].usage.completion_tokens == 3 and completion_chunks[-1].choices == []


@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model)


def test_token_id_prompts_use_the_models_own_tokenizer(client, tokenizer):
    text = "The capital of France is"
    ids = tokenizer.encode(text)
    by_text = client.completions.create(model=SERVED_FP32, prompt=text, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=SERVED_FP32, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.choices[0].text.strip()
    assert by_ids.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model=SERVED_FP32, prompt=[ids, tokenizer.encode("One, two,")], max_tokens=3,
                                      temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == by_text.choices[0].text[:len(batch.choices[0].text)]
    assert batch.usage.prompt_tokens == len(ids) + len(tokenizer.encode("One, two,"))


def test_token_id_embedding_inputs_use_the_models_own_tokenizer(client, tokenizer):
    import numpy as np

    by_text = client.embeddings.create(model=SERVED_FP32, input=["hello world"]).data[0].embedding
    by_ids = client.embeddings.create(model=SERVED_FP32, input=[tokenizer.encode("hello world")]).data[0].embedding
    flat = client.embeddings.create(model=SERVED_FP32, input=tokenizer.encode("hello world")).data[0].embedding
    assert np.allclose(by_text, by_ids, atol=1e-5) and np.allclose(by_ids, flat, atol=1e-5)


def test_fastchat_api_v1_routes_are_gone(served_bundle):
    base = served_bundle["api"].removesuffix("/v1")
    for path in ("/api/v1/chat/completions", "/api/v1/token_check"):
        r = requests.post(base + path, json={"model": SERVED_INT8, "messages": [{"role": "user"}]}, timeout=10,
                          headers={"Authorization": f"Bearer {API_KEYS[0]}"})
        assert r.status_code == 404, (path, r.status_code, r.text[:200])


def test_every_route_in_the_schema_needs_the_key(served_bundle):
    base = served_bundle["api"].removesuffix("/v1")
    paths = requests.get(base + "/openapi.json", timeout=10).json()["paths"]
    assert not [p for p in paths if p.startswith("/api/")]
    for path, methods in paths.items():
        if path in ("/health", "/metrics"):
            continue
        for method in methods:
            r = requests.request(method.upper(), base + path.replace("{model_name}", SERVED_FP32), json={}, timeout=10)
            assert r.status_code == 401, (method, path, r.status_code)


# --- a client that goes away stops its generation -----------------------------------------------------------------

def worker_of(served_bundle, model: str) -> str:
    r = requests.post(served_bundle["controller"] + "/get_worker_address", json={"model": model}, timeout=5)
    return r.json()["address"]


def queue_length(addr: str) -> int:
    return requests.post(addr + "/worker_get_status", json={}, timeout=5).json()["queue_length"]


def idle_after_drop(served_bundle, model: str, drop) -> float:
    """Start a long answer with `drop`, which leaves mid-answer; return how long until the worker's queue is 0
    and its process is idle."""
    import psutil

    addr = worker_of(served_bundle, model)
    proc = psutil.Process(rpc(served_bundle["env"]).supervisor.getProcessInfo(f"workers:{model}")["pid"])
    assert queue_length(addr) == 0
    dropped_at = drop()
    wait_for(lambda: queue_length(addr) == 0, 10, "the worker's queue to empty after the client left")
    freed = time.monotonic() - dropped_at
    proc.cpu_percent(None)
    time.sleep(1.0)
    cpu = proc.cpu_percent(None)
    assert cpu < 30, f"the worker still computes ({cpu:.0f}% CPU) after its client left"
    sys.__stderr__.write(f"\n{model}: queue 0 {freed:.2f} s after the client left, then {cpu:.0f}% CPU\n")
    return freed




def test_a_non_streaming_client_that_gives_up_stops_its_generation(served_bundle):
    def drop():
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(served_bundle["api"] + "/chat/completions", timeout=(5, 3),
                          headers={"Authorization": f"Bearer {API_KEYS[0]}"},
                          json={"model": SERVED_FP32, "messages": LONG_STORY, **NEVER_ENDS})
        return time.monotonic()

    assert idle_after_drop(served_bundle, SERVED_FP32, drop) < 2.0


def test_a_streaming_client_that_leaves_stops_its_generation(served_bundle):
    def drop():
        r = requests.post(served_bundle["api"] + "/chat/completions", stream=True, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEYS[0]}"},
                          json={"model": SERVED_INT8, "messages": LONG_STORY, **NEVER_ENDS, "stream": True})
        lines = (line for line in r.iter_lines() if line)
        for _ in range(4):
            next(lines)
        r.close()
        return time.monotonic()

    assert idle_after_drop(served_bundle, SERVED_INT8, drop) < 2.0
