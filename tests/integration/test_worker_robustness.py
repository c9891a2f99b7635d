"""Nothing wedges the bundle's worker: clients that leave, a full queue, failures, no max_tokens.

A real controller and the bundle's worker (embedded SmolLM2, fp32: it loads in seconds), one slot
and a queue of one, so every limit is reached with a handful of requests.
"""
from __future__ import annotations

import concurrent.futures
import json
import time

import psutil
import pytest
import requests

from tests.helpers import EMBEDDED, bundle_env, free_port, snapshot_for, start, stop, wait_for

MODEL = "smol-robust"
DEFAULT_TOKENS = 12
LONG = "Write a very long story about a dragon who learns to bake bread. Use many details."


@pytest.fixture(scope="module")
def worker(embedded_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("robust-logs")
    # BUNDLE_ALLOW_FAULTS: requests may ask for a failure inside the generation (error-path tests)
    env = bundle_env(LOGDIR=str(logs), BUNDLE_MODELS_DIR=str(embedded_model.parent), BUNDLE_ALLOW_FAULTS="1")
    port = free_port()
    snap, _ = snapshot_for(logs, [{"names": [MODEL], "source": EMBEDDED, "backend": "fp32", "threads": 1,
                                   "port": port, "limit_concurrency": 1, "max_queue": 1, "queue_timeout_s": 4,
                                   "max_tokens_default": DEFAULT_TOKENS}])
    log = logs / "worker.log"
    procs = [start(["-m", "workers.serving.controller", "--deployment", str(snap)], logs / "controller.log", env),
             start(["-m", "workers.serving.worker", "--deployment", str(snap), "--model", MODEL], log, env)]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.post(f"{url}/worker_get_status", timeout=5).ok, 240, "the worker", procs[1], log)
        yield {"url": url, "proc": psutil.Process(procs[1].pid), "log": log}
    finally:
        for p in reversed(procs):
            stop(p)


def status(worker) -> dict:
    return requests.post(f"{worker['url']}/worker_get_status", timeout=5).json()


def long_job(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": LONG}], "temperature": 0,
            "max_new_tokens": 400, **extra}


def wait_idle(worker, within: float = 2.0) -> float:
    """Seconds until the queue is 0 and the worker's CPU is idle; fails after `within` (+ the CPU sample)."""
    t0 = time.monotonic()
    while status(worker)["queue_length"] != 0:
        assert time.monotonic() - t0 < within, f"queue still {status(worker)['queue_length']} after {within} s"
        time.sleep(0.1)
    took = time.monotonic() - t0
    busy = worker["proc"].cpu_percent(interval=None)
    busy = worker["proc"].cpu_percent(interval=1.0)
    assert busy < 25, f"worker still uses {busy:.0f}% CPU after its client left"
    return took


def started_generating(worker, since: int) -> bool:
    return worker["log"].read_text().count("request ") > since or status(worker)["queue_length"] > 0


def test_non_streaming_client_that_leaves_stops_the_generation(worker):
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{worker['url']}/worker_generate", json=long_job(), timeout=2.5)
    wait_idle(worker)


def test_streaming_client_that_leaves_stops_the_generation(worker):
    with requests.post(f"{worker['url']}/worker_generate_stream", json=long_job(), stream=True, timeout=30) as r:
        chunks = r.iter_lines(delimiter=b"\0")
        assert json.loads(next(c for c in chunks if c))["error_code"] == 0  # it is generating
    wait_idle(worker)


def test_full_queue_answers_429_at_once_and_the_others_complete(worker):
    job = long_job(max_new_tokens=24)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(requests.post, f"{worker['url']}/worker_generate", json=job, timeout=120)]
        wait_for(lambda: status(worker)["queue_length"] == 1, 30, "the first request to run")
        running.append(pool.submit(requests.post, f"{worker['url']}/worker_generate", json=job, timeout=120))
        wait_for(lambda: status(worker)["queue_length"] == 2, 30, "the second request to queue")
        t0 = time.monotonic()
        refused = requests.post(f"{worker['url']}/worker_generate", json=job, timeout=120)
        assert time.monotonic() - t0 < 1.0
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert "overloaded" in refused.json()["error"]["message"]
        for f in running:
            r = f.result()
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    assert status(worker)["queue_length"] == 0


def test_a_request_that_waits_too_long_gets_503_busy_not_restarting(worker):
    # The first request holds the only slot, streaming, for longer than the queue timeout (4 s); once the second
    # has its 503, the first leaves (a client that leaves stops its generation) instead of running to its end.
    with requests.post(f"{worker['url']}/worker_generate_stream", json=long_job(max_new_tokens=300), stream=True,
                       timeout=60) as first:
        chunks = first.iter_lines(delimiter=b"\0")
        assert json.loads(next(c for c in chunks if c))["error_code"] == 0  # it is generating
        waited = requests.post(f"{worker['url']}/worker_generate", json=long_job(max_new_tokens=4), timeout=60)
        assert waited.status_code == 503
        message = waited.json()["error"]["message"]
        assert "busy" in message and "restart" not in message
        assert json.loads(next(c for c in chunks if c))["error_code"] == 0  # still generating: it was not restarted
    wait_idle(worker)


def test_no_max_tokens_stops_at_the_configured_default(worker):
    job = long_job()
    del job["max_new_tokens"]
    r = requests.post(f"{worker['url']}/worker_generate", json=job, timeout=120).json()
    assert r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == DEFAULT_TOKENS
    details = requests.post(f"{worker['url']}/model_details", timeout=5).json()
    assert details["max_tokens_default"] == DEFAULT_TOKENS


@pytest.mark.parametrize("bad, status_code", [
    ({"bundle_fault": "after-first-token"}, 500),  # fails inside generation, after the slot was taken
    ({"max_new_tokens": 10**6}, 400),  # refused before: more than the context holds
    ({"temperature": 0.7, "top_p": -1}, 400),
    ({"temperature": float("nan")}, 400),
    ({"stop": 3}, 400),
    ({"messages": []}, 400),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400),
])
def test_every_error_path_frees_the_slot(worker, bad, status_code):
    for _ in range(3):  # more failures than slots + queue: a leak would show as 429 or a hang
        body = json.dumps({**long_job(max_new_tokens=4), **bad})  # Python's json writes NaN, as some clients do
        r = requests.post(f"{worker['url']}/worker_generate", data=body, timeout=60,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == status_code, r.text
        assert r.json()["error"]["message"]
    assert status(worker)["queue_length"] == 0
    ok = requests.post(f"{worker['url']}/worker_generate", json=long_job(max_new_tokens=2), timeout=60)
    assert ok.status_code == 200


def test_an_error_during_a_stream_is_reported_and_frees_the_slot(worker):
    job = long_job(bundle_fault="after-first-token")
    with requests.post(f"{worker['url']}/worker_generate_stream", json=job, stream=True, timeout=60) as r:
        chunks = [json.loads(c) for c in r.iter_lines(delimiter=b"\0") if c]
    assert chunks[-1]["error_code"] != 0 and "injected fault" in chunks[-1]["text"]
    assert status(worker)["queue_length"] == 0


def test_status_token_count_and_cancel_answer_while_it_generates(worker):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = long_job(request_id="cancel-me", max_new_tokens=300)
        busy = pool.submit(requests.post, f"{worker['url']}/worker_generate", json=job, timeout=120)
        wait_for(lambda: status(worker)["queue_length"] == 1, 30, "the request to run")
        time.sleep(1.0)
        for path, body in (("/worker_get_status", None), ("/count_token", {"prompt": "hello"}),
                           ("/model_details", None)):
            t0 = time.monotonic()
            assert requests.post(worker["url"] + path, json=body, timeout=5).ok
            assert time.monotonic() - t0 < 0.5, f"{path} waited for the generation"
        assert requests.post(f"{worker['url']}/worker_cancel", json={"request_id": "cancel-me"},
                             timeout=5).json() == {"cancelled": True}
        answer = busy.result()
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] < 300
    wait_idle(worker)
