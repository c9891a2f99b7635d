"""Every patch of FastChat 0.2.36, in one place: each names the upstream behaviour it corrects and has a test that
fails without it (tests/unit/test_fastchat_compat.py). The bundle's own code is never patched: what a patch needs
from it (the worker-secret clients of workers/serving/auth.py) is passed in.

One entry point per program, called before FastChat serves anything; each is idempotent (a patched function is
wrapped once however often it is called):

    apply_worker(requests_shim)                                  a model worker
    apply_controller(requests_shim, expiry_check_s) -> Controller    the controller
    apply_api(aiohttp_shim, connect_timeout_s)                   the API server

(The web UI uses no FastChat code: workers/serving/web_chat.py talks to the controller and the workers.)

The patches:
1. stream_json_pydantic2 (API): openai_api_server streams `chunk.json(exclude_unset=True, ensure_ascii=False)`;
   pydantic 2 rejects `ensure_ascii` ("`dumps_kwargs` keyword arguments are no longer supported"), the TypeError
   escapes the generator and streaming responses arrive with empty bodies.
2. module_requests (worker, controller): FastChat's modules call each other with their module's own
   `requests` global: no header can be added (the worker secret) and no connect timeout is set (a call to a host
   whose link is down waits for the kernel's SYN retries, about 2 minutes). That global becomes the bundle's
   RequestsShim in each module, never process-wide.
3. controller_expiry (controller): the controller drops silent workers only every CONTROLLER_HEART_BEAT_EXPIRATION
   (90 s), so a vanished host's models stayed listed for up to twice that: check every `expiry_check_s`.
4. controller_daemon_thread (controller): its expiry thread is not a daemon, so after a SIGTERM the process waited
   for it until supervisord's SIGKILL.
5. worker_unavailable (API): when the controller or a worker does not answer, FastChat's `fetch_remote` (still
   used by /v1/models) lets the aiohttp error escape: a bare "500 Internal Server Error". It raises
   WorkerUnavailable instead, which the API answers as 503 naming the address (api_server.install).
6. api_aiohttp (API): `fetch_remote` opens its aiohttp sessions through the module's `aiohttp` global, without
   the worker secret and with only a total timeout: the bundle's AiohttpShim, and a bounded connect.
"""
from __future__ import annotations

import functools
import threading
import time
from types import SimpleNamespace

CONTROLLER_DISPATCH = "shortest_queue"  # FastChat's default


def _wrapped_once(function) -> bool:
    return getattr(function, "_bundle_patch", False)


def _mark(function):
    function._bundle_patch = True
    return function


def _patch_stream_json_pydantic2() -> None:
    import pydantic
    from fastchat.protocol import api_protocol, openai_api_protocol

    def json_compat(self, *, ensure_ascii: bool = True, **kwargs) -> str:
        # pydantic 2 writes non-ASCII characters as UTF-8, which is what ensure_ascii=False asked for.
        return self.model_dump_json(**kwargs)

    for module in (openai_api_protocol, api_protocol):
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, pydantic.BaseModel) and obj is not pydantic.BaseModel:
                obj.json = json_compat


class WorkerUnavailable(Exception):
    """fetch_remote found no one at `url` (the API answers 503 naming it)."""

    def __init__(self, url: str, exc: BaseException):
        super().__init__(f"{url}: {type(exc).__name__}")
        self.url, self.exc = url, exc


def _patch_worker_unavailable(api) -> None:
    import asyncio

    import aiohttp

    if _wrapped_once(api.fetch_remote):
        return
    original = api.fetch_remote

    @functools.wraps(original)
    async def fetch_remote(url, pload=None, name=None):
        try:
            return await original(url, pload, name)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise WorkerUnavailable(url, exc) from exc

    api.fetch_remote = _mark(fetch_remote)


def apply_worker(requests_shim) -> None:
    from fastchat.serve import base_model_worker

    base_model_worker.requests = requests_shim  # 2: registration and heartbeats


def apply_controller(requests_shim, expiry_check_s: float):
    """Patch FastChat's controller module and create its `controller` global (the one its endpoints use), as its
    __main__ block does; returns the module, whose `app` is then served."""
    from fastchat.serve import controller as module

    module.requests = requests_shim  # 2: its status calls to workers

    def heart_beat_controller(controller) -> None:  # 3
        while True:
            time.sleep(expiry_check_s)
            controller.remove_stale_workers_by_expiration()

    module.heart_beat_controller = heart_beat_controller  # read by Controller.__init__
    # 4: the module uses `threading` for nothing else
    module.threading = SimpleNamespace(Thread=functools.partial(threading.Thread, daemon=True))
    module.controller = module.Controller(CONTROLLER_DISPATCH)
    return module


def apply_api(aiohttp_shim, connect_timeout_s: float):
    """Patch FastChat's openai_api_server; returns the module."""
    import aiohttp
    from fastchat.serve import openai_api_server as api

    _patch_stream_json_pydantic2()  # 1
    _patch_worker_unavailable(api)  # 5
    api.aiohttp = aiohttp_shim  # 6
    api.fetch_timeout = aiohttp.ClientTimeout(total=api.fetch_timeout.total, sock_connect=connect_timeout_s)
    return api
