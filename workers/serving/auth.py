"""The worker secret on every call between the bundle's programs, and bounded connects.

FastChat's internal endpoints (a worker's generate, embeddings, token count and status; the
controller's register, heartbeat and list) have no authentication. When the deployment has a
worker secret (see workers/config/secrets.py), every call between controller, workers, API server
and web UI carries it in the header X-Bundle-Worker-Secret, and the controller and the workers
answer 401 to a call without it. Without a secret (allowed on one host only) nothing is checked.

Each program, before its server starts, takes `secret(dep)`, requires it on its app (`install_server`) and
gives its callers the clients made here: FastChat's modules get RequestsShim / AiohttpShim through
workers/serving/fastchat_compat.py; the bundle's own callers take them as arguments (the API's Upstream
takes `httpx_options`, the web chat a RequestsShim); the bundle CLI and tests use `client(dep)`.

The clients also get a connect timeout (CONNECT_TIMEOUT_S): FastChat's own calls have none or
a long one, so a call to a host whose link is down waited for the kernel's SYN retries (about 2
minutes) instead of failing over to a clear 503.

Nothing is patched process-wide, so the secret goes only where the bundle's programs call each other.
"""
from __future__ import annotations

import hmac
import logging
from urllib.parse import urlsplit

import requests

log = logging.getLogger("bundle_auth")

HEADER = "X-Bundle-Worker-Secret"
CONNECT_TIMEOUT_S = 3.0
DEFAULT_READ_TIMEOUT_S = 60.0  # for FastChat calls that set no timeout at all (registration, web -> controller)
REFUSED_RETRY_S = 5.0
REFUSED = "wrong or missing worker secret"


class SecretRefused(requests.exceptions.RequestException):
    """A bundle program answered 401 to an internal call. A RequestException, so FastChat's own
    handlers (heartbeat retry, status poll, web UI) treat it as a failed call and log its text."""


class RegistrationRefused(Exception):
    """The controller answered 401 to /register_worker (deliberately not a RequestException or an
    AssertionError, so the generic "not reachable yet" retry does not swallow it)."""


def headers(secret: str | None) -> dict[str, str]:
    return {HEADER: secret} if secret else {}


def secret(dep) -> str | None:
    """The deployment's worker secret for a program that is starting; exits with a log line when
    it is required but missing, or unreadable."""
    from workers.config import secrets

    try:
        return secrets.worker_secret(dep)
    except secrets.SecretError as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None


# -- receiving side -------------------------------------------------------------------------

class RequireSecret:
    """Pure ASGI middleware: 401 unless the request carries the secret (compared in constant time).

    Pure ASGI (not BaseHTTPMiddleware): the request is turned away before FastChat's endpoint runs,
    so a refused /worker_generate_stream never takes the worker's semaphore."""

    def __init__(self, app, secret: str):
        self.app, self.secret = app, secret.encode()
        self.header = HEADER.lower().encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(self.header, b"")
            if not hmac.compare_digest(given, self.secret):
                body = b'{"detail":"missing or wrong worker secret (header X-Bundle-Worker-Secret)"}'
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def install_server(app, secret: str | None) -> None:
    """Require the secret on every endpoint of `app` (a FastAPI app that has not started yet)."""
    if secret:
        app.add_middleware(RequireSecret, secret=secret)


# -- calling side: requests -------------------------------------------------------------------

class RequestsShim:
    """Stands in for the `requests` module inside one FastChat module: every call carries the
    secret and a connect timeout; a 401 raises SecretRefused (RegistrationRefused for
    /register_worker). Everything else (exceptions, ...) is the real module's."""

    def __init__(self, secret: str | None, who: str = "bundle"):
        self._secret, self._who = secret, who

    def __getattr__(self, name):
        return getattr(requests, name)

    def request(self, method: str, url: str, **kw):
        kw["headers"] = {**(kw.get("headers") or {}), **headers(self._secret)}
        timeout = kw.get("timeout")
        if not isinstance(timeout, tuple):
            kw["timeout"] = (CONNECT_TIMEOUT_S, DEFAULT_READ_TIMEOUT_S if timeout is None else timeout)
        r = requests.request(method, url, **kw)
        if r.status_code == 401:
            r.close()
            parts = urlsplit(url)
            where = f"{parts.scheme}://{parts.netloc}"
            if parts.path.endswith("/register_worker"):
                raise RegistrationRefused(f"controller at {where} refused registration: {REFUSED}")
            raise SecretRefused(f"{where} refused the {self._who}'s call to {parts.path}: {REFUSED} (HTTP 401)")
        return r

    def post(self, url, **kw):
        return self.request("POST", url, **kw)

    def get(self, url, **kw):
        return self.request("GET", url, **kw)


def client(dep) -> RequestsShim:
    """HTTP client for the bundle CLI and tests: .post/.get like requests, with the secret."""
    from workers.config import secrets

    return RequestsShim(secrets.worker_secret(dep), who="bundle CLI")


# -- calling side: the API server's clients ----------------------------------------------------

def httpx_options(secret: str | None, fresh_connections: bool) -> dict:
    """Keyword arguments for the API server's pooled httpx client (workers/serving/worker_client.Upstream): the
    secret on every call, a bounded connect, and a 401 from a worker or the controller raised as a clear 503 (the
    client's API key is not what was refused). `fresh_connections` (several hosts): no pooled keep-alive
    connections, since a call reusing one to a host whose link is down waits for its read timeout (60 s for a
    token count, minutes for a first chunk), while a new connection fails after CONNECT_TIMEOUT_S."""
    return {"headers": {**headers(secret), **({"Connection": "close"} if fresh_connections else {})},
            "event_hooks": {"request": [_bounded_connect], "response": [_httpx_refused]}}


def _refused_error(url, who: str = "API server"):
    from workers.serving import errors

    parts = urlsplit(str(url))
    return errors.ApiError(errors.WORKER_UNAVAILABLE,
                           f"{parts.scheme}://{parts.netloc} refused the {who}'s call to {parts.path}: {REFUSED} "
                           f"(every host of the deployment needs the same worker secret)", code="worker_secret")


async def _bounded_connect(request) -> None:
    """A per-call timeout (`post(..., timeout=60)`) sets httpx's connect timeout too: bound it."""
    timeout = dict(request.extensions.get("timeout") or {})
    connect = timeout.get("connect")
    timeout["connect"] = CONNECT_TIMEOUT_S if connect is None else min(connect, CONNECT_TIMEOUT_S)
    request.extensions["timeout"] = timeout


async def _httpx_refused(response) -> None:
    if response.status_code == 401:
        raise _refused_error(response.request.url)


class AiohttpShim:
    """Stands in for `aiohttp` inside openai_api_server: sessions send the secret, and a 401 raises
    a clear 503 instead of FastChat's error string."""

    def __init__(self, secret: str | None):
        self._headers = headers(secret)

    def __getattr__(self, name):
        import aiohttp

        return getattr(aiohttp, name)

    def ClientSession(self, *args, **kw):  # noqa: N802 (the name FastChat calls)
        import aiohttp

        kw["headers"] = {**(kw.get("headers") or {}), **self._headers}
        kw.setdefault("raise_for_status", _aiohttp_refused)
        return aiohttp.ClientSession(*args, **kw)


async def _aiohttp_refused(response) -> None:
    if response.status == 401:
        raise _refused_error(response.url)
