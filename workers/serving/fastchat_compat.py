"""FastChat 0.2.36 compatibility patches, all in one place. Each has a test (tests/unit/test_fastchat_compat.py,
or with real processes in tests/integration/).

apply() is idempotent and is called by every bundle entry point before FastChat serves anything; the API
server also calls apply_api().

1. stream_json_pydantic2: openai_api_server streams `chunk.json(exclude_unset=True, ensure_ascii=False)`;
   pydantic 2 rejects `ensure_ascii` ("`dumps_kwargs` keyword arguments are no longer supported"),
   the TypeError escapes the generator and streaming responses arrive with empty bodies.
2. smollm2_template: FastChat has no conversation template for SmolLM2; register one whose prompt
   is byte-identical to the tokenizer's own ChatML chat template, and an adapter that selects it.
3. register_retry: the worker's first registration is a bare `requests.post` and kills the worker
   when the controller is not up yet (supervisord starts all programs at once); retry with a log line.
4. worker_unavailable (apply_api): when the controller or a worker does not answer, FastChat's API answers a
   bare "500 Internal Server Error". Its `fetch_remote` (still used by /v1/models) raises errors.ApiError
   503 naming the address instead. The bundle's own generation handlers (api_server.py) answer the same
   503 before a stream starts, and end a stream under way with an `error` event clients raise.
5. usage_length_count: inference.generate_stream reports `completion_tokens = i`, the last loop
   index, so an answer cut off at max_tokens=N reports N-1 tokens. Count the last token too.
"""
from __future__ import annotations

import logging
import time

import requests

from workers.serving import errors

log = logging.getLogger("fastchat_compat")

SMOLLM2_TEMPLATE = "smollm2"
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
REGISTER_RETRY_SECONDS = 2.0

_applied = False


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


def _register_smollm2_template() -> None:
    from fastchat.conversation import Conversation, SeparatorStyle, conv_templates, register_conv_template
    from fastchat.model.model_adapter import BaseModelAdapter, model_adapters, register_model_adapter

    if SMOLLM2_TEMPLATE in conv_templates:
        return
    register_conv_template(
        Conversation(
            name=SMOLLM2_TEMPLATE,
            system_template="<|im_start|>system\n{system_message}",
            system_message=SMOLLM2_DEFAULT_SYSTEM,
            roles=("<|im_start|>user", "<|im_start|>assistant"),
            sep_style=SeparatorStyle.CHATML,
            sep="<|im_end|>",
            stop_str="<|im_end|>",
            stop_token_ids=[0, 2],  # <|endoftext|>, <|im_end|>
        )
    )

    class SmolLM2Adapter(BaseModelAdapter):
        def match(self, model_path: str) -> bool:
            return "smollm2" in model_path.lower()

        def get_default_conv_template(self, model_path: str):
            from fastchat.conversation import get_conv_template

            return get_conv_template(SMOLLM2_TEMPLATE)

    register_model_adapter(SmolLM2Adapter)
    # register_model_adapter appends after the catch-all BaseModelAdapter; put ours first so a
    # path like ".../smollm2-135m-instruct" is not claimed by a broader adapter.
    model_adapters.insert(0, model_adapters.pop())


def _patch_register_retry() -> None:
    from fastchat.serve import base_model_worker

    original = base_model_worker.BaseModelWorker.register_to_controller
    if getattr(original, "_bundle_retry", False):
        return

    def register_with_retry(self):
        attempt = 0
        while True:
            attempt += 1
            try:
                return original(self)
            except (requests.exceptions.RequestException, AssertionError) as exc:
                log.warning(
                    "controller at %s is not reachable yet (attempt %d: %s); retrying in %.0f s",
                    self.controller_addr, attempt, type(exc).__name__, REGISTER_RETRY_SECONDS,
                )
                time.sleep(REGISTER_RETRY_SECONDS)

    register_with_retry._bundle_retry = True
    base_model_worker.BaseModelWorker.register_to_controller = register_with_retry


class WorkerUnavailable(errors.ApiError):
    def __init__(self, url: str, exc: BaseException):
        self.url, self.exc = url, exc
        err = errors.unavailable(url, exc)
        super().__init__(err.kind, err.message, headers=err.headers)


worker_unavailable_message = errors.worker_unavailable_message


def _patch_worker_unavailable() -> None:
    import asyncio

    import aiohttp
    from fastchat.serve import openai_api_server as api

    if getattr(api.fetch_remote, "_bundle_patched", False):
        return
    original_fetch = api.fetch_remote

    async def fetch_remote(url, pload=None, name=None):
        try:
            return await original_fetch(url, pload, name)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise WorkerUnavailable(url, exc) from exc

    fetch_remote._bundle_patched = True
    api.fetch_remote = fetch_remote  # the app's ApiError handler (api_server.install) answers it


def _patch_usage_length_count() -> None:
    from fastchat.serve import inference

    original = inference.generate_stream
    if getattr(original, "_bundle_patched", False):
        return

    def generate_stream(*args, **kwargs):
        for out in original(*args, **kwargs):
            if out.get("finish_reason") == "length" and "usage" in out:
                usage = dict(out["usage"])
                usage["completion_tokens"] += 1
                usage["total_tokens"] += 1
                out = {**out, "usage": usage}
            yield out

    generate_stream._bundle_patched = True
    # model_adapter.get_generate_stream_function imports it from this module at call time.
    inference.generate_stream = generate_stream


def apply() -> None:
    global _applied
    if _applied:
        return
    _patch_stream_json_pydantic2()
    _register_smollm2_template()
    _patch_register_retry()
    _patch_usage_length_count()
    _applied = True


def apply_api() -> None:
    """The API server's patches (imports FastChat's openai_api_server)."""
    apply()
    _patch_worker_unavailable()
