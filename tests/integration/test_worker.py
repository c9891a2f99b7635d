"""A real FastChat controller, the bundle's INT8 worker and FastChat's API server, as processes."""
from __future__ import annotations

import json

import pytest
import requests
from transformers import AutoTokenizer

from tests.helpers import bundle_env, free_port, snapshot_for, start, stop, wait_for

MODEL = "smollm2-int8-test"


@pytest.fixture(scope="module")
def served(embedded_model, int8_entry, int8_cache_root, tmp_path_factory):
    logs = tmp_path_factory.mktemp("worker-logs")
    env = bundle_env(LOGDIR=str(logs), BUNDLE_MODELS_DIR=str(embedded_model.parent),
                     BUNDLE_INT8_CACHE_DIR=str(int8_cache_root))
    worker_port = free_port()
    snap, ports = snapshot_for(logs, [{"names": [MODEL], "source": {"embedded": "smollm2-135m-instruct"},
                                       "backend": "itrex-int8", "threads": 1, "port": worker_port}])
    ctrl_port, api_port = ports["controller"], ports["api"]
    controller = f"http://127.0.0.1:{ctrl_port}"
    worker_log = logs / "worker.log"
    procs = []
    try:
        # The worker starts first, as under supervisord: it must wait for the controller, not die.
        procs.append(start(["-m", "workers.serving.worker", "--deployment", str(snap), "--model", MODEL],
                           worker_log, env))
        wait_for(lambda: "not reachable yet" in worker_log.read_text(), 180, "the worker's retry log line", procs[0], worker_log)
        procs.append(start(["-m", "workers.serving.controller", "--deployment", str(snap)],
                           logs / "controller.log", env))
        wait_for(lambda: MODEL in requests.post(f"{controller}/list_models", timeout=5).json()["models"],
                 60, "the worker to register", procs[0], worker_log)
        procs.append(start(["-m", "workers.serving.api_server", "--deployment", str(snap)], logs / "api.log", env))
        wait_for(lambda: requests.get(f"http://127.0.0.1:{api_port}/v1/models", timeout=5).ok, 60,
                 "the API server", procs[2], logs / "api.log")
        yield {"worker": f"http://127.0.0.1:{worker_port}", "model": embedded_model, "api": f"http://127.0.0.1:{api_port}/v1",
               "controller": controller, "worker_log": worker_log}
    finally:
        for p in reversed(procs):
            stop(p)


def stream_worker(worker: str, params: dict) -> list[dict]:
    r = requests.post(f"{worker}/worker_generate_stream", json=params, stream=True, timeout=120)
    r.raise_for_status()
    return [json.loads(c) for c in r.iter_lines(delimiter=b"\0") if c]


def test_worker_loaded_from_int8_cache_and_answers_generate_stream(served):
    # The worker renders the model's own chat format from messages and stops at its turn end
    # (<|im_end|>) without being told: no FastChat template, no stop list from the client.
    question = [{"role": "user", "content": "What is the capital of France?"}]
    assert requests.post(f"{served['worker']}/count_token", json={"messages": question}, timeout=10).json()["count"] \
        == len(AutoTokenizer.from_pretrained(served["model"]).apply_chat_template(question, add_generation_prompt=True))
    chunks = stream_worker(served["worker"], {"messages": question, "temperature": 0, "max_new_tokens": 48})
    assert len(chunks) >= 2, "generate stream should send incremental chunks"
    assert chunks[-1]["error_code"] == 0 and chunks[-1]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] < 48
    # Run with 1 thread on a 2-core machine in a request thread: catches the qbits thread mismatch.
    assert "Paris" in chunks[-1]["text"]
    assert "INT8 cache hit" in served["worker_log"].read_text()


def test_worker_token_count_details_and_embeddings(served):
    w = served["worker"]
    assert requests.post(f"{w}/count_token", json={"prompt": "Hello world"}, timeout=10).json()["count"] == 2
    assert requests.post(f"{w}/model_details", timeout=10).json()["context_length"] == 8192
    status = requests.post(f"{w}/worker_get_status", timeout=10).json()
    assert status["model_names"] == [MODEL]
    # This INT8 worker runs on neural-speed (a Llama): no hidden states, so a clear 400 that says what to
    # use instead (embeddings themselves: test_api.py, on the fp32 worker).
    r = requests.post(f"{w}/worker_get_embeddings", json={"input": ["hello", "你好"]}, timeout=60)
    assert r.status_code == 400
    assert "neural-speed" in r.json()["error"]["message"] and "runtime: qbits" in r.json()["error"]["message"]
    assert "INT8 runtime neural-speed: 1 threads" in served["worker_log"].read_text()


def test_api_streaming_delivers_deltas(served):
    from openai import OpenAI

    client = OpenAI(base_url=served["api"], api_key="unused")
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=24, stream=True,
    )
    deltas = [c.choices[0].delta.content or "" for c in stream]
    assert len([d for d in deltas if d]) >= 2, deltas  # empty bodies before the pydantic-2 patch
    assert "Paris" in "".join(deltas)
