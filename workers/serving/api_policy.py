"""The bundle's input policy for FastChat's OpenAI-style API server.

Bad input gets a 4xx JSON error that names the problem, and never a 5xx. FastChat 0.2.36 already
checks ranges (temperature, top_p, negative max_tokens, n) and context overflow. This adds:
- a clear 401 for a missing or wrong API key (FastChat's message is empty);
- the unknown-model message lists the served models;
- empty `messages`, messages without a valid role or string content (FastChat raised KeyError: 500);
- an explicit max_tokens larger than the room left in the context (FastChat silently clamped it);
- `n` above MAX_N, and empty embedding input;
- request bodies above MAX_BODY_BYTES (413), checked before the body is parsed.
"""
from __future__ import annotations

import json
from typing import Optional

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials

MAX_BODY_BYTES = 1 << 20  # 1 MiB: about 250k tokens of text, far more than any served context
MAX_N = 8
ROLES = ("system", "user", "assistant")


class ApiKeyError(Exception):
    pass


def _error(status: int, message: str, code: int | str, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"object": "error", "message": message, "code": code, "type": type_,
                         "error": {"message": message, "type": type_, "code": code}}, status_code=status)


class BodySizeLimit:
    """Pure ASGI middleware: refuse request bodies larger than `limit` bytes with 413."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size = [], 0
        if not too_big:
            while True:
                message = await receive()
                chunks.append(message)
                size += len(message.get("body", b""))
                if size > self.limit:
                    too_big = True
                    break
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
        if too_big:
            response = _error(413, f"request body exceeds the limit of {self.limit} bytes", 40013)
            return await response(scope, receive, send)

        async def replay():
            return chunks.pop(0) if chunks else await receive()

        return await self.app(scope, replay, send)


def install(api_module) -> None:
    """Install the policy on fastchat.serve.openai_api_server (module object passed in)."""
    from fastchat.constants import ErrorCode
    from fastchat.protocol.openai_api_protocol import ChatCompletionRequest

    app = api_module.app
    original_check_requests = api_module.check_requests
    original_check_length = api_module.check_length

    async def check_api_key(auth: Optional[HTTPAuthorizationCredentials] = Depends(api_module.get_bearer_token)):
        keys = api_module.app_settings.api_keys
        if not keys:
            return None
        if auth is None:
            raise ApiKeyError("missing API key: send the header 'Authorization: Bearer <key>'")
        if auth.credentials not in keys:
            raise ApiKeyError("invalid API key")  # never echo the key
        return auth.credentials

    async def on_api_key_error(request: Request, exc: ApiKeyError):
        return _error(401, str(exc), "invalid_api_key")

    def message_problem(messages) -> str | None:
        if isinstance(messages, str):
            return None if messages.strip() else "messages is an empty string"
        if not messages:
            return "messages must contain at least one message"
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                return f"messages[{i}].role must be one of {', '.join(ROLES)} (got {m.get('role')!r})"
            if "content" not in m:
                return f"messages[{i}] has no 'content'"
        return None

    def check_requests(request):
        ret = original_check_requests(request)
        if ret is not None:
            return ret
        if isinstance(request, ChatCompletionRequest):
            problem = message_problem(request.messages)
            if problem:
                return api_module.create_error_response(ErrorCode.VALIDATION_TYPE_ERROR, problem)
        if request.n is not None and request.n > MAX_N:
            return api_module.create_error_response(
                ErrorCode.PARAM_OUT_OF_RANGE, f"{request.n} is greater than the maximum of {MAX_N} - 'n'")
        return None

    async def check_length(request, prompt, max_tokens, worker_addr):
        length, error = await original_check_length(request, prompt, max_tokens, worker_addr)
        if error is None and isinstance(max_tokens, int) and max_tokens > length:
            error = api_module.create_error_response(
                ErrorCode.CONTEXT_OVERFLOW,
                f"max_tokens={max_tokens} is too large for model {request.model}: after this prompt, "
                f"at most {length} tokens fit in its context window",
            )
        return (None, error) if error is not None else (length, None)

    async def check_model(request):
        models = await api_module.fetch_remote(
            api_module.app_settings.controller_address + "/list_models", None, "models")
        if request.model in models:
            return None
        available = ", ".join(sorted(models)) or "none (no worker is registered)"
        return api_module.create_error_response(
            ErrorCode.INVALID_MODEL, f"model {request.model!r} is not served here; available models: {available}")

    original_process_input = api_module.process_input

    def process_input(model_name, inp):
        if inp is None or (isinstance(inp, (list, str)) and len(inp) == 0):
            raise EmptyInput("input must not be empty")
        return original_process_input(model_name, inp)

    async def on_empty_input(request: Request, exc: "EmptyInput"):
        return _error(400, str(exc), ErrorCode.VALIDATION_TYPE_ERROR)

    async def on_bad_value(request: Request, exc: ValueError):
        # FastChat raises ValueError for some inputs it cannot turn into a prompt (e.g. unknown role).
        return _error(400, f"invalid request: {exc}", ErrorCode.VALIDATION_TYPE_ERROR)

    app.dependency_overrides[api_module.check_api_key] = check_api_key
    app.add_exception_handler(ApiKeyError, on_api_key_error)
    app.add_exception_handler(EmptyInput, on_empty_input)
    app.add_exception_handler(json.JSONDecodeError, on_bad_value)
    app.add_exception_handler(ValueError, on_bad_value)
    api_module.check_requests = check_requests
    api_module.check_length = check_length
    api_module.check_model = check_model
    api_module.process_input = process_input
    app.add_middleware(BodySizeLimit, limit=MAX_BODY_BYTES)


class EmptyInput(ValueError):
    pass
