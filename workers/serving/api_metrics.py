"""Prometheus metrics of the API server, served at /metrics (text format, prometheus_client).

Per model: requests by endpoint and HTTP status, requests in flight, tokens in and out, time to first token,
decode time, request duration; and each model's worker queue (running + waiting, from the worker's own
/worker_get_status, asked at scrape time) and whether the worker answers. A model label is only ever a
configured or registered model name ("unknown" otherwise), so clients cannot grow the label set.
"""
from __future__ import annotations

import asyncio
import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)

from workers.serving import errors

UNKNOWN = "unknown"
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings",
             "/v1/models": "models"}


def endpoint_of(path: str) -> str:
    if path in ENDPOINTS:
        return ENDPOINTS[path]
    if path.startswith("/v1/engines/") and path.endswith("/embeddings"):
        return "embeddings"
    return "other"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.requests = Counter("bundle_api_requests", "API requests answered, by model, endpoint and HTTP status "
                                "(499: the client went away)", ["model", "endpoint", "status"], registry=r)
        self.in_flight = Gauge("bundle_api_requests_in_flight", "API requests being answered now", ["model"], registry=r)
        self.prompt_tokens = Counter("bundle_api_prompt_tokens", "prompt tokens of answered requests", ["model"],
                                     registry=r)
        self.completion_tokens = Counter("bundle_api_completion_tokens", "generated tokens", ["model"], registry=r)
        self.ttft = Histogram("bundle_api_time_to_first_token_seconds",
                              "from the request's arrival to its first generated text", ["model"], registry=r,
                              buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900))
        self.decode = Histogram("bundle_api_decode_seconds", "from the first generated text to the end of the answer",
                                ["model"], registry=r, buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
        self.duration = Histogram("bundle_api_request_duration_seconds", "whole request, by model and endpoint",
                                  ["model", "endpoint"], registry=r,
                                  buckets=(0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600))
        self.queue_length = Gauge("bundle_worker_queue_length",
                                  "requests running or waiting on the model's worker (its /worker_get_status)",
                                  ["model"], registry=r)
        self.worker_up = Gauge("bundle_worker_up", "1 when the model's worker answers its status, else 0", ["model"],
                               registry=r)

    # --- per request (called by the handlers; the middleware closes the books) -----------------------------
    @staticmethod
    def _state(request) -> dict:
        return request.scope.setdefault("state", {})

    def label(self, request, model: str) -> None:
        """Count this request under `model` (a name known to be configured or registered)."""
        self._state(request)["bundle_model"] = model

    def started(self, request, model: str) -> None:
        state = self._state(request)
        state["bundle_model"] = model
        if not state.get("bundle_in_flight"):
            state["bundle_in_flight"] = model
            self.in_flight.labels(model).inc()

    def arrived(self, request) -> float:
        return self._state(request).get("bundle_t0", time.monotonic())

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(model).inc(max(0, prompt))
        self.completion_tokens.labels(model).inc(max(0, completion))

    # --- scrape ---------------------------------------------------------------------------------------------
    async def refresh_workers(self, upstream, models: list[str]) -> None:
        async def one(model: str) -> None:
            try:
                addr = await upstream.worker_address(model)
                if not addr:
                    raise errors.not_registered(model)
                status = await upstream.status(addr, model, timeout=2.0)
                self.queue_length.labels(model).set(float(status.get("queue_length") or 0))
                self.worker_up.labels(model).set(1)
            except (errors.ApiError, ValueError, TypeError):
                self.worker_up.labels(model).set(0)

        await asyncio.gather(*(one(m) for m in models))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware: times every /v1 request and counts it by model, endpoint and final status once its
    response (stream included) has ended; decrements the in-flight gauge the handler raised."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["bundle_t0"] = t0 = time.monotonic()
        status = {"code": errors.CLIENT_CLOSED_STATUS}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            if status["code"] == errors.CLIENT_CLOSED_STATUS and not state.get("bundle_client_gone"):
                status["code"] = 500
            raise
        finally:
            model = state.get("bundle_model", UNKNOWN)
            endpoint = endpoint_of(scope.get("path", ""))
            if state.get("bundle_client_gone"):
                status["code"] = errors.CLIENT_CLOSED_STATUS
            self.metrics.requests.labels(model, endpoint, str(status["code"])).inc()
            self.metrics.duration.labels(model, endpoint).observe(time.monotonic() - t0)
            if state.get("bundle_in_flight"):
                self.metrics.in_flight.labels(state["bundle_in_flight"]).dec()
