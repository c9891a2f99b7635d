"""Every error the OpenAI-style API answers, in one table.

Each kind of error has one HTTP status, one OpenAI `type` and one `code`. Every error body is OpenAI's
envelope, plus the top-level fields FastChat's own clients read:

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...},
     "object": "error", "message": ..., "type": ..., "code": ...}

Bad input is always a 4xx naming the problem (and `param`, the field, where there is one); 5xx is kept for
what the server itself cannot do: a worker that is down, busy, or failed.

The same table maps what a model worker answers back: the bundle's worker answers HTTP 400/429/503 with
`{"error": {"message", "type", "code"}}` before it streams; FastChat's worker puts an `error_code` into a
chunk instead (`from_worker_http`, `from_worker_chunk`).
"""
from __future__ import annotations

import json
import reprlib
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse


@dataclass(frozen=True)
class Kind:
    status: int
    type: str
    code: str
    meaning: str


# --- the table -------------------------------------------------------------------------------------------
INVALID_REQUEST = Kind(400, "invalid_request_error", "invalid_request", "a malformed request")
INVALID_JSON = Kind(400, "invalid_request_error", "invalid_json", "the body is not a JSON object")
MISSING_PARAMETER = Kind(400, "invalid_request_error", "missing_required_parameter", "a required field is absent")
INVALID_VALUE = Kind(400, "invalid_request_error", "invalid_value", "a field has the wrong type or range")
UNSUPPORTED_PARAMETER = Kind(400, "invalid_request_error", "unsupported_parameter",
                             "an OpenAI parameter this server does not implement")
UNSUPPORTED_CONTENT = Kind(400, "invalid_request_error", "unsupported_content",
                           "a content part the served models cannot read (images, audio, files)")
CONTEXT_LENGTH_EXCEEDED = Kind(400, "invalid_request_error", "context_length_exceeded",
                               "the prompt, or prompt plus max_tokens, does not fit the context window")
INVALID_API_KEY = Kind(401, "invalid_request_error", "invalid_api_key", "missing or wrong API key")
MODEL_NOT_FOUND = Kind(404, "invalid_request_error", "model_not_found", "no such model is served here")
NOT_FOUND = Kind(404, "invalid_request_error", "not_found", "no such endpoint")
METHOD_NOT_ALLOWED = Kind(405, "invalid_request_error", "method_not_allowed", "wrong HTTP method")
REQUEST_TOO_LARGE = Kind(413, "invalid_request_error", "request_too_large", "the body exceeds the size limit")
QUEUE_FULL = Kind(429, "rate_limit_error", "queue_full", "the model's worker queue is full (see Retry-After)")
WORKER_ERROR = Kind(502, "server_error", "worker_error", "the model worker failed and gave no reason")
WORKER_UNAVAILABLE = Kind(503, "worker_unavailable", "worker_unavailable",
                          "the worker or controller does not answer (restarting, stopped)")
WORKER_BUSY = Kind(503, "worker_busy", "worker_busy", "the worker is alive but no slot freed in time")
INTERNAL = Kind(500, "server_error", "internal_error", "a bug in the API server")

TABLE: dict[str, Kind] = {k.code: k for k in (
    INVALID_REQUEST, INVALID_JSON, MISSING_PARAMETER, INVALID_VALUE, UNSUPPORTED_PARAMETER, UNSUPPORTED_CONTENT,
    CONTEXT_LENGTH_EXCEEDED, INVALID_API_KEY, MODEL_NOT_FOUND, NOT_FOUND, METHOD_NOT_ALLOWED, REQUEST_TOO_LARGE,
    QUEUE_FULL, WORKER_ERROR, WORKER_UNAVAILABLE, WORKER_BUSY, INTERNAL)}
DEFAULT_RETRY_AFTER_S = 2

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel, _short.maxlist, _short.maxdict = 60, 60, 2, 4, 4


def short(value: Any) -> str:
    """A bounded repr of client input for messages (safe on deep or huge values)."""
    return _short.repr(value)


class ApiError(Exception):
    """An error answer: raise it anywhere in a handler; the app turns it into the envelope."""

    def __init__(self, kind: Kind, message: str, param: str | None = None, headers: Mapping[str, str] | None = None,
                 type_: str | None = None, code: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.param = kind, message, param
        self.headers = dict(headers or {})
        self.type = type_ or kind.type
        self.code = code or kind.code
        if kind.status == 429 and "Retry-After" not in self.headers:
            self.headers["Retry-After"] = str(DEFAULT_RETRY_AFTER_S)

    @property
    def status(self) -> int:
        return self.kind.status

    def body(self) -> dict:
        return envelope(self.message, self.type, self.code, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """The error as a server-sent event, for a stream already under way (the openai client raises it)."""
        return f"data: {json.dumps(self.body(), ensure_ascii=False)}\n\n"


def envelope(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code},
            "object": "error", "message": message, "type": type_, "code": code}


class ClientDisconnected(Exception):
    """The end client went away; its work on the worker has been cancelled. Nothing is sent back."""


CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": only ever seen in metrics and logs


# --- pydantic / FastAPI validation errors ------------------------------------------------------------------
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "json-or-python"}


def param_path(loc) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'; pydantic's union-member tags are dropped."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part.startswith("function-")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


def from_validation(errs: list[dict]) -> ApiError:
    """The first pydantic error, with the field it is about as `param` (FastChat answered str(exc))."""
    if not errs:
        return ApiError(INVALID_REQUEST, "invalid request")
    first = errs[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return ApiError(INVALID_JSON, f"the request body is not valid JSON: {reason}")
    param = param_path(first.get("loc", ()))
    kind = MISSING_PARAMETER if first.get("type") == "missing" else INVALID_VALUE
    msg = first.get("msg", "invalid value")
    if kind is MISSING_PARAMETER:
        return ApiError(kind, f"{param}: this field is required", param)
    got = f" (got {short(first['input'])})" if "input" in first else ""
    return ApiError(kind, f"{param}: {msg}{got}" if param else f"{msg}{got}", param)


# --- what workers and the controller answer --------------------------------------------------------------
def base_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else url


def worker_unavailable_message(url: str, exc: BaseException) -> str:
    return (f"the model worker or controller at {base_url(url)} stopped answering ({type(exc).__name__}); "
            f"it may be restarting - retry in a few seconds")


def unavailable(url: str, exc: BaseException) -> ApiError:
    return ApiError(WORKER_UNAVAILABLE, worker_unavailable_message(url, exc),
                    headers={"Retry-After": str(DEFAULT_RETRY_AFTER_S)})


def not_registered(model: str) -> ApiError:
    return ApiError(WORKER_UNAVAILABLE,
                    f"model {model!r} has no registered worker: its worker stopped answering or is restarting - "
                    f"retry in a few seconds", headers={"Retry-After": str(DEFAULT_RETRY_AFTER_S)})


def busy(model: str, waited_s: float, queue_length: int | None = None) -> ApiError:
    queue = f" ({queue_length} requests queued or running)" if queue_length is not None else ""
    return ApiError(WORKER_BUSY, f"model {model} is busy: waited {waited_s:.0f} s for a slot{queue}; retry later",
                    headers={"Retry-After": str(max(DEFAULT_RETRY_AFTER_S, int(waited_s // 10)))})


def _status_kind(status: int) -> Kind:
    return {400: INVALID_VALUE, 401: INVALID_API_KEY, 404: MODEL_NOT_FOUND, 413: REQUEST_TOO_LARGE,
            429: QUEUE_FULL}.get(status, INVALID_REQUEST if 400 <= status < 500 else WORKER_ERROR)


def from_worker_http(status: int, body: bytes, headers: Mapping[str, str], url: str) -> ApiError:
    """A non-200 answer of a worker (or the controller) before any chunk: the same status and the worker's own
    message and `param`; `type` and `code` from this table (a worker's code is kept when it names an entry of
    the same status, e.g. context_length_exceeded); Retry-After passed on."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, str):
        err = {"message": err}
    if not isinstance(err, dict):
        err = {"message": data.get("message") or data.get("text")} if isinstance(data, dict) else {}
    message = err.get("message") or f"the model worker at {base_url(url)} answered HTTP {status}"
    named = TABLE.get(str(err.get("code")))
    if status == 503:
        kind = WORKER_BUSY if "busy" in f"{err.get('type')} {err.get('code')}" else WORKER_UNAVAILABLE
    elif named is not None and named.status == status:
        kind = named
    else:
        kind = _status_kind(status)
    param = err.get("param") if isinstance(err.get("param"), str) else None
    extra = {}
    retry_after = headers.get("retry-after") or headers.get("Retry-After")
    if retry_after:
        extra["Retry-After"] = retry_after
    return ApiError(kind, str(message), param, extra)


def from_worker_chunk(error_code: int, text: str) -> ApiError:
    """FastChat's in-band `error_code` (fastchat.constants.ErrorCode) to the table."""
    group = int(error_code) // 100
    if group in (400, 403):
        kind = CONTEXT_LENGTH_EXCEEDED if int(error_code) == 40303 else INVALID_VALUE
    elif group == 401:
        kind = INVALID_API_KEY
    elif group == 429:
        kind = QUEUE_FULL
    elif int(error_code) in (50005, 50006):  # CONTROLLER_NO_WORKER, CONTROLLER_WORKER_TIMEOUT
        kind = WORKER_UNAVAILABLE
    else:
        kind = WORKER_ERROR
    return ApiError(kind, text or f"the model worker failed (error code {error_code})")
