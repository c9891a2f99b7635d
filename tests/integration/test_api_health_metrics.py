"""/health and /metrics of the API server, on the shared served bundle (no API key needed for either)."""
from __future__ import annotations

import openai
import pytest
import requests
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEYS, SERVED_FP32, SERVED_INT8
from tests.helpers import rpc, wait_for

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def base(served_bundle) -> str:
    return served_bundle["api"].removesuffix("/v1")


def health(base: str) -> requests.Response:
    return requests.get(base + "/health", timeout=10)


def samples(base: str) -> dict:
    r = requests.get(base + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_health_is_200_when_every_model_has_a_worker(base):
    r = health(base)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "controller": "ok", "models": {SERVED_INT8: "registered", SERVED_FP32: "registered"}}


def test_metrics_count_a_request(base, served_bundle):
    before = samples(base)
    client = OpenAI(base_url=served_bundle["api"], api_key=API_KEYS[0], max_retries=0, timeout=120)
    r = client.chat.completions.create(model=SERVED_INT8, messages=QUESTION, max_tokens=5, temperature=0)
    after = samples(base)
    labels = {"model": SERVED_INT8, "endpoint": "chat", "status": "200"}
    assert value(after, "bundle_api_requests_total", **labels) == value(before, "bundle_api_requests_total", **labels) + 1
    assert (value(after, "bundle_api_completion_tokens_total", model=SERVED_INT8)
            - value(before, "bundle_api_completion_tokens_total", model=SERVED_INT8)) == r.usage.completion_tokens
    assert (value(after, "bundle_api_prompt_tokens_total", model=SERVED_INT8)
            - value(before, "bundle_api_prompt_tokens_total", model=SERVED_INT8)) == r.usage.prompt_tokens
    for histogram in ("bundle_api_time_to_first_token_seconds_count", "bundle_api_decode_seconds_count"):
        assert value(after, histogram, model=SERVED_INT8) == value(before, histogram, model=SERVED_INT8) + 1
    assert value(after, "bundle_api_requests_in_flight", model=SERVED_INT8) == 0
    for model in (SERVED_INT8, SERVED_FP32):
        assert value(after, "bundle_worker_up", model=model) == 1
        assert ("bundle_worker_queue_length", (("model", model),)) in after
    # an error is counted under its status, and a name nobody serves under "unknown"
    requests.post(served_bundle["api"] + "/chat/completions", json={"model": "gpt-9", "messages": QUESTION},
                  headers={"Authorization": f"Bearer {API_KEYS[0]}"}, timeout=10)
    assert value(samples(base), "bundle_api_requests_total", model="unknown", endpoint="chat", status="404") >= 1


def test_health_is_503_naming_a_stopped_worker_then_200_when_it_is_back(base, served_bundle):
    proxy = rpc(served_bundle["env"]).supervisor
    client = OpenAI(base_url=served_bundle["api"], api_key=API_KEYS[0], max_retries=0, timeout=120)
    proxy.stopProcess(f"workers:{SERVED_FP32}")
    try:
        wait_for(lambda: health(base).status_code == 503, 60, "/health to notice the stopped worker")
        body = health(base).json()
        assert body["status"] == "unhealthy" and body["models"] == {SERVED_INT8: "registered", SERVED_FP32: "missing"}
        assert SERVED_FP32 in body["error"]["message"] and SERVED_INT8 not in body["error"]["message"]
        r = requests.post(served_bundle["api"] + "/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {API_KEYS[0]}"},
                          json={"model": SERVED_FP32, "messages": QUESTION, "max_tokens": 4})
        assert r.status_code == 503 and "stopped answering" in r.json()["error"]["message"], r.text
        assert value(samples(base), "bundle_worker_up", model=SERVED_FP32) == 0
        assert "Paris" in client.chat.completions.create(model=SERVED_INT8, messages=QUESTION, max_tokens=12,
                                                         temperature=0).choices[0].message.content
    finally:
        proxy.startProcess(f"workers:{SERVED_FP32}")
    wait_for(lambda: health(base).status_code == 200, 180, "/health to be 200 with the worker back")

    def answers() -> bool:
        try:
            return bool(client.chat.completions.create(model=SERVED_FP32, messages=QUESTION, max_tokens=4).choices)
        except openai.APIError:
            return False

    wait_for(answers, 60, "the restarted worker to answer")
