"""The worker secret on every call between the bundle's programs, and bounded connects.

FastChat's internal endpoints (a worker's generate, embeddings, token count and status; the
controller's register, heartbeat and list) have no authentication. When the deployment has a
worker secret (see workers/config/secrets.py), every call between controller, workers, API server
and web UI carries it in the header X-Bundle-Worker-Secret, and the controller and the workers
answer 401 to a call without it. Without a secret (allowed on one host only) nothing is checked.

One hook per process, each called before its server starts:

    install_controller(fastchat.serve.controller, dep)   controller -> worker status calls; its app
    install_worker(dep, app)                             worker -> register, heartbeat; its app
    install_api(fastchat.serve.openai_api_server, dep)   API -> controller, worker (worker_client, fetch_remote)
    install_web(dep)                                     web -> controller, worker (web_chat)
    client(dep)                                          the bundle CLI, tests

The clients also get a connect timeout (CONNECT_TIMEOUT_S): FastChat's own calls have none or
a long one, so a call to a host whose link is down waited for the kernel's SYN retries (about 2
minutes) instead of failing over to a clear 503.

Calls are patched per module (the module's own `requests`/`aiohttp` global, the API's httpx
client), never process-wide, so the secret goes only where the bundle's programs call each other.
"""
from __future__ import annotations

import hmac
import logging
import time
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


# -- per-process hooks ----------------------------------------------------------------------

def install_worker(dep, app) -> str | None:
    """In a model worker, before it registers and serves `app` (its FastAPI app): registration and
    heartbeats (FastChat's BaseModelWorker) carry the secret, a refused registration logs a clear
    line and retries, and `app` requires the secret."""
    from fastchat.serve import base_model_worker

    value = secret(dep)
    base_model_worker.requests = RequestsShim(value, who="worker")
    cls = base_model_worker.BaseModelWorker
    inner = cls.register_to_controller
    if not getattr(inner, "_bundle_refusal", False):
        def register_to_controller(self):
            attempt = 0
            while True:
                try:
                    return inner(self)
                except RegistrationRefused as exc:
                    attempt += 1
                    log.error("%s (HTTP 401, attempt %d); this worker is not registered. Give every host the same "
                              "worker secret; retrying in %.0f s", exc, attempt, REFUSED_RETRY_S)
                    time.sleep(REFUSED_RETRY_S)

        register_to_controller._bundle_refusal = True
        register_to_controller._bundle_retry = getattr(inner, "_bundle_retry", False)
        cls.register_to_controller = register_to_controller
    install_server(app, value)
    return value


def install_controller(controller_module, dep) -> str | None:
    """In the controller (fastchat.serve.controller imported, not run with runpy): its status
    calls to workers carry the secret; its app requires it."""
    value = secret(dep)
    controller_module.requests = RequestsShim(value, who="controller")
    install_server(controller_module.app, value)
    return value


def install_api(api_module, dep) -> str | None:
    """In the API server, before it serves: its calls to the controller and the workers carry the
    secret, and a 401 from them is answered as a clear 503 rather than passed on (the client's API
    key is not what was refused).

    - the bundle's handlers: the pooled httpx client of workers/serving/worker_client.Upstream
      (secret header, a connect timeout and a response hook on the client when it is created; with several hosts,
      `Connection: close`, so every call opens a connection and a vanished host fails its connect);
    - FastChat's own /v1/models handler: `fetch_remote`'s aiohttp session (the module's `aiohttp`
      global is replaced; its connect timeout bounded)."""
    import aiohttp

    from workers.serving import worker_client

    from workers.config import hosts

    value = secret(dep)
    # Across hosts, no pooled keep-alive connections: a call reusing one to a host whose link is
    # down waits for its read timeout (60 s for a token count, minutes for a first chunk), while
    # a new connection fails after CONNECT_TIMEOUT_S, so the client gets its 503 in seconds.
    fresh_connections = hosts.several(dep)
    original = worker_client.Upstream.http.fget
    if getattr(original, "_bundle_auth", False):  # installed before (tests): only the secret changes
        original = original._bundle_original

    def http(self):
        client = original(self)
        if getattr(client, "_bundle_secret", None) != value:
            client.headers.pop(HEADER, None)
            client.headers.update(headers(value))
            if _httpx_refused not in client.event_hooks.get("response", []):
                client.event_hooks = {"request": [*client.event_hooks.get("request", []), _bounded_connect],
                                      "response": [*client.event_hooks.get("response", []), _httpx_refused]}
            if fresh_connections:
                client.headers["Connection"] = "close"
            client._bundle_secret = value
        return client

    http._bundle_auth, http._bundle_original = True, original
    worker_client.Upstream.http = property(http)
    api_module.fetch_timeout = aiohttp.ClientTimeout(total=api_module.fetch_timeout.total,
                                                     sock_connect=CONNECT_TIMEOUT_S)
    api_module.aiohttp = _AiohttpShim(value)
    return value


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


class _AiohttpShim:
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


def install_web(dep) -> str | None:
    """In the web UI: the bundle's web_chat (model list, worker address and defaults, stream,
    cancel) sends the secret and a connect timeout."""
    from workers.serving import web_chat

    value = secret(dep)
    web_chat.requests = RequestsShim(value, who="web UI")
    return value
