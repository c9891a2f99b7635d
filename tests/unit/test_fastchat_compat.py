"""One test per patch in workers/serving/fastchat_compat.py, each failing without its patch (the numbers are the
module docstring's), and one that applying twice wraps once."""
from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import aiohttp
import pydantic
import pytest

from workers.serving import fastchat_compat

CLOSED = "http://127.0.0.1:9"  # nothing listens there


class Recorder:
    """A stand-in for the `requests` module (what auth.RequestsShim is to FastChat's modules): records each call."""

    def __init__(self, status: int = 200, answer: dict | None = None):
        self.calls, self.status, self.answer = [], status, answer or {}

    def post(self, url, **kw):
        self.calls.append(url)
        return SimpleNamespace(status_code=self.status, json=lambda: self.answer, text="")

    def __getattr__(self, name):
        import requests

        return getattr(requests, name)


@pytest.fixture(scope="module")
def api():
    return fastchat_compat.apply_api(aiohttp, 3.0)


def test_1_stream_chunk_json_accepts_ensure_ascii_under_pydantic2(api):
    from fastchat.protocol.openai_api_protocol import (ChatCompletionResponseStreamChoice,
                                                       ChatCompletionStreamResponse, DeltaMessage)

    chunk = ChatCompletionStreamResponse(
        model="m", choices=[ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(content="你好"), finish_reason=None)]
    )
    with pytest.raises(TypeError, match="dumps_kwargs"):  # the upstream bug this patch exists for
        pydantic.BaseModel.json(chunk, exclude_unset=True, ensure_ascii=False)
    text = chunk.json(exclude_unset=True, ensure_ascii=False)
    assert "你好" in text  # raw UTF-8, as ensure_ascii=False asks
    assert json.loads(text)["choices"][0]["delta"] == {"content": "你好"}


def test_2_the_workers_registration_goes_through_the_given_requests(monkeypatch):
    import logging

    from fastchat.serve import base_model_worker
    from fastchat.serve.base_model_worker import BaseModelWorker

    monkeypatch.setattr(base_model_worker, "logger", logging.getLogger("worker"))  # set by a worker's __init__
    calls = Recorder()
    fastchat_compat.apply_worker(calls)
    worker = SimpleNamespace(controller_addr=CLOSED, worker_addr="http://w", multimodal=False,
                             get_status=lambda: {"model_names": ["m"], "speed": 1, "queue_length": 0})
    BaseModelWorker.register_to_controller(worker)
    assert calls.calls == [CLOSED + "/register_worker"]


@pytest.fixture(scope="module")
def controller_module():
    return fastchat_compat.apply_controller(Recorder(answer={"model_names": ["m"], "speed": 1, "queue_length": 0}),
                                            expiry_check_s=0.05)


def test_2_the_controllers_status_calls_go_through_the_given_requests(controller_module):
    controller_module.controller.get_worker_status("http://w")
    assert controller_module.requests.calls[-1] == "http://w/worker_get_status"


def test_3_a_silent_worker_is_dropped_within_the_check_interval_of_its_expiry(controller_module):
    controller = controller_module.controller
    controller.register_worker("http://silent", True, {"model_names": ["m"], "speed": 1, "queue_length": 0}, False)
    controller.worker_info["http://silent"].last_heart_beat = time.time() - 10_000  # long past the expiry
    deadline = time.monotonic() + 2.0
    while "http://silent" in controller.worker_info and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "http://silent" not in controller.worker_info


def test_4_the_controllers_expiry_thread_does_not_hold_the_process(controller_module):
    assert controller_module.controller.heart_beat_thread.daemon


def test_5_an_unreachable_address_raises_worker_unavailable_naming_it(api):
    with pytest.raises(fastchat_compat.WorkerUnavailable) as info:
        asyncio.run(api.fetch_remote(CLOSED + "/list_models", {}))
    assert info.value.url == CLOSED + "/list_models"


def test_6_fetch_remote_opens_its_sessions_through_the_given_aiohttp_with_a_bounded_connect():
    opened = []

    class Shim:
        def __getattr__(self, name):
            return getattr(aiohttp, name)

        def ClientSession(self, *args, **kw):  # noqa: N802
            opened.append(kw)
            return aiohttp.ClientSession(*args, **kw)

    module = fastchat_compat.apply_api(Shim(), 2.5)
    try:
        with pytest.raises(fastchat_compat.WorkerUnavailable):
            asyncio.run(module.fetch_remote(CLOSED + "/list_models", {}))
        assert len(opened) == 1 and module.fetch_timeout.sock_connect == 2.5
    finally:
        fastchat_compat.apply_api(aiohttp, 3.0)


def test_applying_twice_wraps_once(api):
    for _ in range(2):
        fastchat_compat.apply_api(aiohttp, 3.0)
    assert not hasattr(api.fetch_remote.__wrapped__, "__wrapped__")  # FastChat's own function inside, once
