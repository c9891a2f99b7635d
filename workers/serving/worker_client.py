"""The API server's HTTP client for the controller and the model workers: one pooled httpx client.

Every call answers or raises errors.ApiError from the one table:
- nothing answers at the address (refused, reset, killed mid-stream) -> 503 worker_unavailable, naming it;
- the worker answers an HTTP error before streaming (the bundle's worker: 400/429/503 with
  {"error": {...}}) -> the same status and its own message, Retry-After passed on;
- no first chunk within the wait -> 503 worker_busy if the worker still answers /worker_get_status
  ("model X is busy: waited N s for a slot"), else worker_unavailable;
- a chunk with FastChat's in-band `error_code` -> the matching table entry.
Closing a WorkerStream, or cancelling any call, closes its connection: the worker sees its client go.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import AsyncIterator, Awaitable, Callable

import httpx

from workers.serving import errors
from workers.serving.errors import ApiError

HEADERS = {"User-Agent": "CPU LLM Bundle API"}
CONTROL_TIMEOUT_S = 10.0  # controller calls and the worker's small calls (model details, templates, status)
COUNT_TIMEOUT_S = 60.0  # /count_token tokenizes the prompt on the worker
CHUNK_TIMEOUT_S = 300.0  # between two chunks of a stream under way
DEFAULT_FIRST_CHUNK_TIMEOUT_S = 900.0  # waiting for a slot plus prefill, when the deployment says nothing
DISCONNECT_POLL_S = 0.25
# An idle pooled connection is dropped after this long, well before uvicorn closes it on its side (its
# timeout_keep_alive, 5 s). With httpx's default (also 5 s) a request sent on a connection just as the worker
# closed it failed with ReadError, answered 503 "stopped answering" (2 in a 1,000-request soak run).
KEEPALIVE_EXPIRY_S = 2.0


class Upstream:
    """`http_options`: what the client adds to every call (auth.httpx_options: the worker secret, a bounded
    connect, a 401 as a clear 503). `unavailable(url, exc)`: the error for an address that does not answer
    (errors.unavailable, or placement's naming the model and its host)."""

    def __init__(self, controller_address: Callable[[], str], http_options: dict | None = None,
                 unavailable: Callable[[str, BaseException], ApiError] = errors.unavailable):
        self._controller = controller_address
        self._options = http_options or {}
        self.unavailable = unavailable
        self._http: httpx.AsyncClient | None = None
        self._context_len: dict[tuple[str, str], int] = {}
        self._conv: dict[tuple[str, str], dict] = {}

    @property
    def controller(self) -> str:
        return self._controller()

    @property
    def http(self) -> httpx.AsyncClient:
        # Created on first use, inside the server's event loop.
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), trust_env=False,
                                           headers={**HEADERS, **self._options.get("headers", {})},
                                           event_hooks=self._options.get("event_hooks"),
                                           limits=httpx.Limits(max_connections=None, max_keepalive_connections=64,
                                                               keepalive_expiry=KEEPALIVE_EXPIRY_S))
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def forget(self, addr: str) -> None:
        """Drop what is cached about a worker address (it stopped answering; it may come back different)."""
        for cache in (self._context_len, self._conv):
            for key in [k for k in cache if k[0] == addr]:
                cache.pop(key, None)

    async def post_json(self, url: str, payload: dict | None = None, timeout: float = CONTROL_TIMEOUT_S) -> dict:
        try:
            r = await self.http.post(url, json=payload, timeout=timeout)
        except httpx.HTTPError as exc:
            raise self.unavailable(url, exc) from exc
        if r.status_code != 200:
            raise errors.from_worker_http(r.status_code, r.content, r.headers, url)
        try:
            data = r.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ApiError(errors.WORKER_ERROR, f"{errors.base_url(url)} answered something that is not a JSON object")
        return data

    # --- controller ---------------------------------------------------------------------------------------
    async def list_models(self, timeout: float = CONTROL_TIMEOUT_S) -> list[str]:
        data = await self.post_json(self.controller + "/list_models", timeout=timeout)
        return list(data.get("models") or [])

    async def worker_address(self, model: str) -> str:
        data = await self.post_json(self.controller + "/get_worker_address", {"model": model})
        return data.get("address") or ""

    # --- a worker's small calls -----------------------------------------------------------------------------
    async def _worker_call(self, addr: str, path: str, payload: dict, timeout: float = CONTROL_TIMEOUT_S) -> dict:
        try:
            return await self.post_json(addr + path, payload, timeout)
        except ApiError as err:
            if err.kind is errors.WORKER_UNAVAILABLE:
                self.forget(addr)
            raise

    async def context_length(self, addr: str, model: str) -> int:
        key = (addr, model)
        if key not in self._context_len:
            data = await self._worker_call(addr, "/model_details", {"model": model})
            self._context_len[key] = int(data["context_length"])
        return self._context_len[key]

    async def conv_template(self, addr: str, model: str) -> dict:
        key = (addr, model)
        if key not in self._conv:
            data = await self._worker_call(addr, "/worker_get_conv_template", {"model": model})
            self._conv[key] = data["conv"]
        return self._conv[key]

    async def count_tokens(self, addr: str, model: str, prompt: str, messages: list[dict] | None = None,
                           template_kwargs: dict | None = None, extra: dict | None = None) -> int:
        """The prompt's tokens, as the worker counts them: from `messages` in the model's own format when given
        (the bundle's worker, with the request's chat_template_kwargs; `extra`: the tools it renders with them),
        else from FastChat's `prompt`."""
        payload = {"model": model, "prompt": prompt, **(extra or {})}
        if messages is not None:
            payload["messages"] = messages
        if template_kwargs:
            payload["chat_template_kwargs"] = template_kwargs
        data = await self._worker_call(addr, "/count_token", payload, COUNT_TIMEOUT_S)
        return int(data["count"])

    async def status(self, addr: str, model: str, timeout: float = 3.0) -> dict:
        return await self._worker_call(addr, "/worker_get_status", {"model": model}, timeout)

    async def embeddings(self, addr: str, payload: dict, timeout: float) -> dict:
        data = await self._worker_call(addr, "/worker_get_embeddings", payload, timeout)
        if data.get("error_code"):
            raise errors.from_worker_chunk(data["error_code"], str(data.get("text", "")))
        return data

    async def _no_first_chunk(self, addr: str, model: str, waited_s: float) -> ApiError:
        try:
            status = await self.status(addr, model)
        except ApiError:
            return self.unavailable(addr, httpx.ReadTimeout(f"no answer in {waited_s:.0f} s"))
        return errors.busy(model, waited_s, status.get("queue_length"))

    # --- generation ---------------------------------------------------------------------------------------
    async def open_stream(self, addr: str, payload: dict, model: str, first_timeout_s: float) -> "WorkerStream":
        """POST /worker_generate_stream; returns once the worker accepted (HTTP 200), else raises."""
        url = addr + "/worker_generate_stream"
        started = time.monotonic()
        request = self.http.build_request("POST", url, json=payload)
        try:
            async with asyncio.timeout(first_timeout_s):  # not wait_for: see WorkerStream.chunks
                response = await self.http.send(request, stream=True)
        except TimeoutError:
            raise await self._no_first_chunk(addr, model, time.monotonic() - started) from None
        except httpx.HTTPError as exc:
            self.forget(addr)
            raise self.unavailable(url, exc) from exc
        if response.status_code != 200:
            try:
                body = await response.aread()
            except httpx.HTTPError:
                body = b""
            finally:
                await response.aclose()
            raise errors.from_worker_http(response.status_code, body, response.headers, url)
        left = max(1.0, first_timeout_s - (time.monotonic() - started))
        return WorkerStream(self, response, addr, model, left)


class WorkerStream:
    """One answer streaming from a worker: NUL-delimited JSON chunks with the text so far."""

    def __init__(self, upstream: Upstream, response: httpx.Response, addr: str, model: str, first_timeout_s: float):
        self.upstream, self.response, self.addr, self.model = upstream, response, addr, model
        self.first_timeout_s = first_timeout_s
        self.opened = time.monotonic()

    async def chunks(self) -> AsyncIterator[dict]:
        raw_chunks = self.response.aiter_raw()
        buffer, got_any = b"", False
        try:
            while True:
                try:
                    # Not asyncio.wait_for: on Python 3.11 it returns the chunk when the cancellation of a client
                    # that left lands as the chunk arrives, and the answer then streams on to its end.
                    async with asyncio.timeout(CHUNK_TIMEOUT_S if got_any else self.first_timeout_s):
                        raw = await raw_chunks.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if got_any:
                        raise self.upstream.unavailable(self.addr, httpx.ReadTimeout(
                            f"no output for {CHUNK_TIMEOUT_S:.0f} s")) from None
                    raise await self.upstream._no_first_chunk(self.addr, self.model,
                                                              time.monotonic() - self.opened) from None
                except httpx.HTTPError as exc:
                    self.upstream.forget(self.addr)
                    raise self.upstream.unavailable(self.addr, exc) from exc
                got_any = True
                buffer += raw
                while (end := buffer.find(b"\0")) >= 0:
                    piece, buffer = buffer[:end], buffer[end + 1:]
                    if not piece.strip():
                        continue
                    try:
                        data = json.loads(piece)
                    except ValueError:
                        raise ApiError(errors.WORKER_ERROR,
                                       f"the model worker at {self.addr} sent a chunk that is not JSON") from None
                    if not isinstance(data, dict):
                        raise ApiError(errors.WORKER_ERROR, f"the model worker at {self.addr} sent a malformed chunk")
                    if data.get("error_code"):
                        err = data.get("error")
                        if isinstance(err, dict) and err.get("message"):
                            raise ApiError(errors.from_worker_chunk(data["error_code"], "").kind, str(err["message"]),
                                           type_=err.get("type"), code=str(err["code"]) if err.get("code") else None)
                        raise errors.from_worker_chunk(data["error_code"], str(data.get("text", "")))
                    yield data
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.response.aclose()


async def unless_disconnected(request, awaitable: Awaitable, poll_s: float = DISCONNECT_POLL_S):
    """Await `awaitable` while polling whether the end client is still there; if it went away, cancel the
    work (which closes its connection to the worker) and raise errors.ClientDisconnected."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if task in done:
                return task.result()
            if await request.is_disconnected():
                raise errors.ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved


async def all_or_nothing(coros) -> list:
    """gather(), but the first failure cancels the others (each cancellation closes its worker connection)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
        for t in tasks:
            if not t.cancelled():
                t.exception()
