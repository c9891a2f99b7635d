"""The API's side of the generation contract, against a fake controller and a fake worker (no model).

Real sockets and real uvicorn servers (in threads of this process), so these prove what FastChat's own worker
cannot show: the worker's HTTP 400/429/503 answers mapped to the same status (Retry-After passed on), a worker
that is alive but sends nothing named busy, and a client that goes away (streaming or not) closing the
worker's connection within about a second.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import requests
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tests.helpers import free_port, wait_for

FAKE, GHOST = "fake", "ghost"  # ghost: configured, never registered
USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}


class Fake:
    def __init__(self) -> None:
        self.payloads: list[dict] = []
        self.disconnected: list[float] = []
        self.finished: list[float] = []


def fake_worker(fake: Fake) -> FastAPI:
    from fastchat.conversation import get_conv_template

    conv = dataclasses.asdict(get_conv_template("qwen-7b-chat"))  # ChatML
    conv["sep_style"] = int(conv["sep_style"])
    app = FastAPI()

    @app.post("/model_details")
    async def details():
        return {"context_length": 256}

    @app.post("/count_token")
    async def count(request: Request):
        return {"count": len((await request.json())["prompt"].split()), "error_code": 0}

    @app.post("/worker_get_conv_template")
    async def template():
        return {"conv": conv}

    @app.post("/worker_get_status")
    async def status():
        return {"model_names": [FAKE], "speed": 1, "queue_length": 5}

    @app.post("/worker_get_embeddings")
    async def embeddings(request: Request):
        p = await request.json()
        fake.payloads.append(p)
        return {"embedding": [[float(len(str(x)))] for x in p["input"]], "token_num": 3 * len(p["input"])}

    def chunk(text, finish=None, **extra) -> bytes:
        return json.dumps({"text": text, "error_code": 0, "usage": USAGE, "finish_reason": finish, **extra}).encode() + b"\0"

    @app.post("/worker_generate_stream")
    async def generate(request: Request):
        p = await request.json()
        fake.payloads.append(p)
        mode = p["messages"][-1]["content"] if p.get("messages") else str(p.get("prompt"))
        if mode == "mode:400":
            return JSONResponse({"error": {"message": "this prompt does not fit fake's context", "type":
                                           "invalid_request_error", "code": "context_length_exceeded"}}, 400)
        if mode == "mode:429":
            return JSONResponse({"error": {"message": "fake's queue is full (16 waiting)", "type": "rate_limit_error",
                                           "code": "queue_full"}}, 429, headers={"Retry-After": "7"})
        if mode == "mode:busy":
            return JSONResponse({"error": {"message": "model fake is busy: waited 300 s for a slot", "type":
                                           "worker_busy", "code": "worker_busy"}}, 503)
        if mode == "mode:hang":
            await asyncio.sleep(30)
        if mode == "mode:inband":
            return StreamingResponse(iter([json.dumps({"text": "token id 99999 is not in the vocabulary",
                                                       "error_code": 40001}).encode() + b"\0"]))

        async def slow():
            try:
                for i in range(1, 600):
                    yield chunk("x" * i)
                    await asyncio.sleep(0.05)
                yield chunk("x" * 600, "length")
                fake.finished.append(time.monotonic())
            finally:
                if not fake.finished:
                    fake.disconnected.append(time.monotonic())

        async def normal():
            yield chunk("He")
            yield chunk("Hello \ufffd")
            yield chunk("Hello 你好", "length", logprobs=None)

        return StreamingResponse(slow() if mode == "mode:slow" else normal())

    return app


def fake_controller(worker_url: str) -> FastAPI:
    app = FastAPI()

    @app.post("/list_models")
    async def list_models():
        return {"models": [FAKE]}

    @app.post("/get_worker_address")
    async def address(request: Request):
        return {"address": worker_url if (await request.json())["model"] == FAKE else ""}

    return app


class Served:
    def __init__(self, app, port: int):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "a test server to start")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.server.force_exit = True  # not waiting for the fake worker's open streams to end (up to 10 s)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def api():
    import aiohttp

    from workers.serving import api_server, fastchat_compat

    fastchat_api = fastchat_compat.apply_api(aiohttp, 3.0)

    fake = Fake()
    ports = {"worker": free_port(), "controller": free_port(), "api": free_port()}
    worker_url = f"http://127.0.0.1:{ports['worker']}"
    dep = SimpleNamespace(hosts={}, models=[SimpleNamespace(names=[FAKE], queue_timeout_s=None),
                                  SimpleNamespace(names=[GHOST], queue_timeout_s=None)])
    bundle = api_server.install(fastchat_api, dep)
    bundle.first_chunk_timeout = lambda model: 1.5  # a worker that sends nothing for 1.5 s is "busy" here
    fastchat_api.app_settings.controller_address = f"http://127.0.0.1:{ports['controller']}"
    fastchat_api.app_settings.api_keys = None
    with Served(fake_worker(fake), ports["worker"]), Served(fake_controller(worker_url), ports["controller"]), \
            Served(fastchat_api.app, ports["api"]):
        yield {"url": f"http://127.0.0.1:{ports['api']}", "fake": fake}
    bundle.configure(None)
    del bundle.first_chunk_timeout


def post(api, path, body, **kwargs):
    return requests.post(api["url"] + path, json=body, timeout=kwargs.pop("timeout", 30), **kwargs)


def chat_body(content, **extra):
    return {"model": FAKE, "messages": [{"role": "user", "content": content}], **extra}


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return events


def test_chat_payload_follows_the_contract(api):
    r = post(api, "/v1/chat/completions", chat_body([{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]))
    assert r.status_code == 200, r.text
    p = api["fake"].payloads[-1]
    assert p["messages"] == [{"role": "user", "content": "Hi\nthere"}]
    assert p["prompt"].endswith("<|im_start|>user\nHi\nthere<|im_end|>\n<|im_start|>assistant\n")  # for FastChat's worker
    assert all(p[k] is None for k in ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty",
                                      "frequency_penalty", "max_new_tokens"))
    assert p["stop"] == [] and p["stop_token_ids"] == [] and p["echo"] is False and p["request_id"].startswith("chatcmpl-")
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "Hello 你好" and body["choices"][0]["finish_reason"] == "length"
    assert body["object"] == "chat.completion" and body["created"] > 0


def test_given_fields_and_token_id_prompts_reach_the_worker(api):
    r = post(api, "/v1/completions", {"model": FAKE, "prompt": [[1, 2, 3], "words here"], "temperature": 0, "top_k": 5,
                                      "presence_penalty": 0.5, "frequency_penalty": -0.5, "stop": "END"})
    assert r.status_code == 200, r.text
    ids, text = api["fake"].payloads[-2:]
    assert ids["prompt_token_ids"] == [1, 2, 3] and "prompt" not in ids and text["prompt"] == "words here"
    assert (ids["temperature"], ids["top_k"], ids["presence_penalty"], ids["frequency_penalty"], ids["stop"],
            ids["echo"], ids["max_new_tokens"]) == (0, 5, 0.5, -0.5, ["END"], False, 16)
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]


def test_echo_is_done_by_the_api(api):
    r = post(api, "/v1/completions", {"model": FAKE, "prompt": ["Say: ", "Or: "], "echo": True, "n": 2})
    assert [c["text"] for c in r.json()["choices"]] == ["Say: Hello 你好"] * 2 + ["Or: Hello 你好"] * 2
    assert all(p["echo"] is False for p in api["fake"].payloads[-4:])
    r = post(api, "/v1/completions", {"model": FAKE, "prompt": "Say: ", "echo": True, "stream": True}, stream=True)
    texts = [c["choices"][0]["text"] for c in sse_events(r)[:-1]]
    assert texts[0] == "Say: " and "".join(texts) == "Say: Hello 你好"


def test_max_completion_tokens_reaches_the_worker_as_max_new_tokens(api):
    assert post(api, "/v1/chat/completions", chat_body("hi", max_completion_tokens=9)).status_code == 200
    assert api["fake"].payloads[-1]["max_new_tokens"] == 9


def test_usage_counts_the_prompt_once_whatever_n(api):
    usage = post(api, "/v1/chat/completions", chat_body("hi", n=3)).json()["usage"]
    assert usage == {"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13}


def test_stream_chunks_carry_object_created_and_the_usage_chunk(api):
    r = post(api, "/v1/chat/completions", chat_body("hi", stream=True, n=2, stream_options={"include_usage": True}),
             stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["created"] > 0 and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 4,
                                                                   "total_tokens": 11}
    assert all(c["usage"] is None for c in chunks[:-1])
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == "Hello 你好"  # no U+FFFD streamed
        assert mine[-1]["finish_reason"] == "length"


def test_completion_stream_chunks(api):
    r = post(api, "/v1/completions", {"model": FAKE, "prompt": "p", "stream": True}, stream=True)
    chunks = sse_events(r)[:-1]
    assert all(c["object"] == "text_completion" and c["created"] > 0 for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello 你好"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode,status,fragment", [
    ("mode:400", 400, "does not fit fake's context"),
    ("mode:429", 429, "queue is full"),
    ("mode:busy", 503, "model fake is busy: waited 300 s for a slot"),
    ("mode:inband", 400, "not in the vocabulary"),
    ("mode:hang", 503, "model fake is busy: waited 2 s for a slot (5 requests queued or running)"),
])
def test_worker_errors_before_the_stream_are_http_errors(api, mode, status, fragment, stream):
    r = post(api, "/v1/chat/completions", chat_body(mode, stream=stream))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and set(err) == {"message", "type", "param", "code"}
    if status == 429:
        assert r.headers["Retry-After"] == "7" and err["code"] == "queue_full"
    if mode in ("mode:busy", "mode:hang"):
        assert err["type"] == "worker_busy" and "stopped answering" not in err["message"]


def test_unknown_model_404_and_configured_but_unregistered_503(api):
    r = post(api, "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "available models: fake, ghost" in r.json()["error"]["message"]
    r = post(api, "/v1/embeddings", {"model": GHOST, "input": "x"})
    assert r.status_code == 503 and "ghost" in r.json()["error"]["message"] and r.headers["Retry-After"]


def test_health_names_the_missing_model(api):
    r = requests.get(api["url"] + "/health", timeout=10)
    assert r.status_code == 503 and r.json()["models"] == {FAKE: "registered", GHOST: "missing"}
    assert "no worker is registered for model ghost" in r.json()["error"]["message"]


def test_embeddings_in_batches_keep_their_order(api):
    r = post(api, "/v1/embeddings", {"model": FAKE, "input": ["a", "bb", "ccc", "dddd", [5, 6, 7, 8, 9]]})
    assert r.status_code == 200, r.text
    assert [d["index"] for d in r.json()["data"]] == [0, 1, 2, 3, 4]
    assert [d["embedding"] for d in r.json()["data"]] == [[1.0], [2.0], [3.0], [4.0], [15.0]]
    assert r.json()["usage"]["prompt_tokens"] == 15 and api["fake"].payloads[-1]["input"] == [[5, 6, 7, 8, 9]]


def _dropped_within(api, start_drop) -> float:
    fake = api["fake"]
    fake.disconnected.clear()
    fake.finished.clear()
    dropped_at = start_drop()
    wait_for(lambda: fake.disconnected, 10, "the worker to see its client go")
    assert not fake.finished
    return fake.disconnected[-1] - dropped_at


def test_non_streaming_client_that_leaves_closes_the_worker_connection_within_a_second(api):
    def drop():
        with pytest.raises(requests.exceptions.ReadTimeout):
            post(api, "/v1/chat/completions", chat_body("mode:slow"), timeout=1.5)
        return time.monotonic()

    latency = _dropped_within(api, drop)
    sys.__stderr__.write(f"worker saw the client go {latency:.2f} s after it left\n")
    assert latency < 1.0


def test_streaming_client_that_leaves_closes_the_worker_connection_within_a_second(api):
    def drop():
        r = post(api, "/v1/completions", {"model": FAKE, "prompt": "mode:slow", "stream": True}, stream=True)
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        r.close()
        return time.monotonic()

    latency = _dropped_within(api, drop)
    sys.__stderr__.write(f"worker saw the client go {latency:.2f} s after it left\n")
    assert latency < 1.0


def test_metrics_count_by_status_and_nothing_stays_in_flight(api):
    text = requests.get(api["url"] + "/metrics", timeout=10).text
    assert 'bundle_api_requests_total{endpoint="chat",model="fake",status="200"}' in text
    assert 'bundle_api_requests_total{endpoint="chat",model="fake",status="429"}' in text
    assert 'bundle_api_requests_total{endpoint="chat",model="fake",status="499"}' in text
    assert 'bundle_api_requests_in_flight{model="fake"} 0.0' in text
    assert 'bundle_worker_queue_length{model="fake"} 5.0' in text and 'bundle_worker_up{model="ghost"} 0.0' in text
    assert 'bundle_api_completion_tokens_total{model="fake"}' in text
    assert 'bundle_api_time_to_first_token_seconds_count{model="fake"}' in text
