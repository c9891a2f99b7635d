"""Run FastChat's OpenAI-style API server with the bundle's input rules, errors, cancellation, health and metrics.

    python -m workers.serving.api_server --deployment var/run/deployment.json

API keys are read here, at start, from an environment variable and/or a file outside git, and set on
FastChat's app settings directly: passing them as `--api-keys` would put them in the process list, the
supervisord config and FastChat's startup log line ("args: ...").

The app is FastChat's openai_api_server `app` (a documented compatibility layer), with
- /v1/chat/completions, /v1/completions, /v1/embeddings (and /v1/engines/{model}/embeddings) answered by
  the handlers below: FastChat's protocol models, the input rules of api_policy, the error table of errors;
- /v1/models answered by FastChat's own handler, behind the same API-key check;
- FastChat's /api/v1/* routes removed (they bypassed every check);
- /health and /metrics, which need no API key.

The generation contract with a model worker, POST /worker_generate_stream (used for streaming and
non-streaming requests alike, so a client that goes away always closes the worker's connection):

    {"model", and "messages" (chat: [{"role", "content": str}], the worker renders the model's own prompt)
              or "prompt" (str) or "prompt_token_ids" ([int], decoded with the model's own tokenizer),
     "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty":
              null = the model's default,
     "max_new_tokens": null = the model's default (capped by the context),
     "stop": [str] (the user's; the worker adds the model's own), "stop_token_ids": [int],
     "echo": false (the API echoes a completion prompt itself), "request_id": str,
     "logprobs": null | int (top logprobs per generated token, 0..20), "prompt_logprobs": null | int (the same
              for the prompt's tokens: completions with echo), "logit_bias": null | {"token id": -100..100},
     "seed": null | int (a sampled answer that repeats, alone or batched),
     chat only: "tools": [{"name", "description", "parameters"}] (rendered in the model's own tool protocol),
     "tool_choice": "auto" | "none" | "required" | {"name"}, "response_format": {"type": "json_object"} |
     {"type": "json_schema", "schema"}; messages may then hold assistant "tool_calls" [{"id", "name",
     "arguments"}] and "tool" messages (workers/serving/tool_calls.py),
     "chat_template_kwargs": {...} (chat, when the client gives it: variables of the model's chat template)}

Chat requests also carry FastChat's `prompt`, built from the worker's /worker_get_conv_template, for FastChat's
own worker; a worker that reads `messages` ignores it. The worker answers HTTP 400/429/503 with
{"error": {"message", "type", "code"}} (Retry-After on 429) before streaming, or streams NUL-delimited JSON
chunks {"text": the whole text so far, "error_code": 0, "usage": {prompt_tokens, completion_tokens,
total_tokens}, "finish_reason": null | "stop" | "length"}; for a reasoning model's chat answer also
"reasoning_content" and "content" (the text split at its thinking markers, workers/engine/reasoning.py;
the answer's message gets both, a stream sends reasoning_content deltas, then content deltas); with logprobs
asked also "token_logprobs": {"offset": int, "content": [entry]} (the tokens since the chunk before) and, in the
first chunk, "prompt_logprobs": [entry]; an entry is {"id", "token", "bytes", "logprob", "top": [{"id", "token",
"bytes", "logprob"}]}, the logprob the model's log-softmax of its raw logits (null for a prompt's first token); with
tools, the last chunk's "tool_calls": [{"name", "arguments"}] are the calls read from the answer and its "text"
what else the answer said.
Closing the connection cancels the request.
Embeddings: POST /worker_get_embeddings {"model", "input": [str | [int]], "encoding_format"} ->
{"embedding": [...], "token_num": int} or {"error_code", "text"}.
"""
from __future__ import annotations

import hmac
import logging
import sys
import time
from typing import Optional

import shortuuid
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from fastchat.protocol.openai_api_protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                                   CompletionResponse, CompletionResponseChoice, EmbeddingsRequest,
                                                   EmbeddingsResponse, UsageInfo)
from starlette.exceptions import HTTPException as StarletteHTTPException

from workers.config import hosts, secrets
from workers.serving import api_policy, errors, launch, placement, tool_calls
from workers.serving.api_metrics import Metrics, MetricsMiddleware
from workers.serving.api_policy import AnswerDeltas, TextDeltas, Usage, finish_reason, message_fields, sse
from workers.serving.ending_stream import EndingStreamingResponse
from workers.serving.errors import ApiError
from workers.serving.fastchat_compat import WorkerUnavailable
from workers.serving.worker_client import (DEFAULT_FIRST_CHUNK_TIMEOUT_S, Upstream, all_or_nothing,
                                           unless_disconnected)

log = logging.getLogger("api_server")

PREFILL_ALLOWANCE_S = 600.0  # beyond the worker's own queue timeout, before the API gives up on a first chunk
EMBEDDING_BATCH = 4  # inputs per /worker_get_embeddings call (FastChat's WORKER_API_EMBEDDING_BATCH_SIZE)
REPLACED_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/engines/{model_name}/embeddings"}


async def _next_or_none(chunks):
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None


def upstream_stream(events, closers, state: dict) -> EndingStreamingResponse:
    """An SSE stream that, however it ends (finished, client gone, error), closes its connections to the worker."""
    async def on_end(scope):
        for close in closers:
            await close()
        if not state.get("completed"):
            scope.setdefault("state", {})["bundle_client_gone"] = True

    return EndingStreamingResponse(events, on_end, media_type="text/event-stream")


class StreamLogprobs:
    """The logprobs of one streamed choice: each chunk sent carries those of the tokens the worker reported since
    the chunk before (a token whose text is held back reports with the next chunk), so together they are the
    non-streamed answer's."""

    def __init__(self, kind: str, asked: bool):
        self.kind, self.asked, self.pending = kind, asked, []
        self.completion = api_policy.CompletionLogprobs()

    def add(self, chunk: dict) -> None:
        self.pending += (chunk.get("token_logprobs") or {}).get("content") or []

    def prompt(self, chunk: dict | None) -> dict | None:
        if not self.asked:
            return None
        return self.completion.part((chunk or {}).get("prompt_logprobs") or [])

    def take(self) -> dict | None:
        if not self.asked:
            return None
        entries, self.pending = self.pending, []
        return api_policy.chat_logprobs(entries) if self.kind == "chat" else self.completion.part(entries)


class BundleApi:
    """The bundle's handlers, bound to one deployment, one upstream client and one metrics registry."""

    def __init__(self, api_module, dep=None, http_options: dict | None = None):
        self.settings = api_module.app_settings
        self.registered: set[str] = set()
        self.upstream = Upstream(lambda: self.settings.controller_address, http_options)
        self.configure(dep)
        self.metrics = Metrics()

    def configure(self, dep) -> None:
        self.specs = {name: m for m in dep.models for name in m.names} if dep is not None else {}
        # with hosts: errors for a model whose host is away name model and host
        self.not_registered, self.upstream.unavailable = placement.outage_errors(dep)

    # --- shared steps ------------------------------------------------------------------------------------
    def first_chunk_timeout(self, model: str) -> float:
        spec = self.specs.get(model)
        queue_timeout = getattr(spec, "queue_timeout_s", None) if spec is not None else None
        return float(queue_timeout) + PREFILL_ALLOWANCE_S if queue_timeout else DEFAULT_FIRST_CHUNK_TIMEOUT_S

    @staticmethod
    async def body(request: Request) -> dict:
        return api_policy.parse_json(await request.body())

    def label(self, request: Request, model) -> None:
        if isinstance(model, str) and (model in self.specs or model in self.registered):
            self.metrics.label(request, model)

    async def resolve(self, request: Request, model: str) -> str:
        """The address of a worker serving `model`: 404 for a model not served here, 503 while its worker is away."""
        served = await self.upstream.list_models()
        self.registered = set(served)
        if model not in served:
            if model in self.specs:
                raise self.not_registered(model)
            raise api_policy.unknown_model(model, sorted(set(served) | set(self.specs)))
        self.metrics.started(request, model)
        addr = await self.upstream.worker_address(model)
        if not addr:
            raise self.not_registered(model)
        return addr

    async def generate(self, request: Request, model: str, addr: str, payload: dict) -> dict:
        """One answer, streamed from the worker and collected: its last chunk."""
        t0 = self.metrics.arrived(request)
        stream = await self.upstream.open_stream(addr, payload, model, self.first_chunk_timeout(model))
        last, first_text_at, entries, prompt_entries = None, None, [], None
        try:
            async for chunk in stream.chunks():
                if first_text_at is None and chunk.get("text"):
                    first_text_at = time.monotonic()
                    self.metrics.ttft.labels(model).observe(first_text_at - t0)
                entries += (chunk.get("token_logprobs") or {}).get("content") or []
                prompt_entries = chunk.get("prompt_logprobs", prompt_entries)
                last = chunk
        finally:
            await stream.aclose()
        if last is None:
            raise ApiError(errors.WORKER_ERROR, f"the model worker at {addr} ended the answer without any output")
        last = {**last, "logprob_entries": entries, "prompt_logprob_entries": prompt_entries or []}
        if first_text_at is not None:
            self.metrics.decode.labels(model).observe(time.monotonic() - first_text_at)
        return last

    async def generate_all(self, request: Request, model: str, addr: str, payloads: list[dict]) -> list[dict]:
        return await unless_disconnected(
            request, all_or_nothing([self.generate(request, model, addr, p) for p in payloads]))

    async def stream(self, request: Request, model: str, addr: str, jobs: list[tuple], id_: str, kind: str,
                     include_usage: bool, tools: tool_calls.ToolPlan | None = None) -> Response:
        """Start streaming only once the worker accepted the first answer and sent its first chunk, so that
        errors before it (bad input, queue full, busy, down) are real HTTP errors, not a 200 stream."""
        timeout = self.first_chunk_timeout(model)
        first_stream = await unless_disconnected(request, self.upstream.open_stream(addr, jobs[0][1], model, timeout))
        chunks = first_stream.chunks()
        try:
            first = await unless_disconnected(request, _next_or_none(chunks))
        except BaseException:
            await first_stream.aclose()
            raise
        state: dict = {}
        closers = [first_stream.aclose]
        events = self.events(request, model, addr, jobs, id_, kind, include_usage, chunks, first, closers, state,
                             tools)
        return upstream_stream(events, closers, state)

    async def events(self, request, model, addr, jobs, id_, kind, include_usage, chunks0, first0, closers, state,
                     tools=None):
        created = int(time.time())
        # With tools that may be called, the answer is read for calls once it is whole: its text is held back.
        held = tools is not None and tools.active
        t0 = self.metrics.arrived(request)
        usage = Usage()
        timeout = self.first_chunk_timeout(model)

        async def with_first(first, chunks):
            if first is not None:
                yield first
            async for c in chunks:
                yield c

        try:
            for index, (prompt_key, payload, echoed) in enumerate(jobs):
                if index == 0:
                    chunks, first = chunks0, first0
                else:
                    s = await self.upstream.open_stream(addr, payload, model, timeout)
                    closers.append(s.aclose)
                    chunks, first = s.chunks(), None
                logprobs = StreamLogprobs(kind, payload.get("logprobs") is not None)
                if kind == "chat":
                    yield sse(api_policy.chat_chunk(id_, created, model, index, {"role": "assistant", "content": ""},
                                                    include_usage=include_usage))
                if echoed:
                    if payload.get("prompt_logprobs") is not None and first is None:
                        first = await _next_or_none(chunks)  # it carries the prompt's logprobs
                    yield sse(api_policy.completion_chunk(id_, created, model, index, echoed, include_usage=include_usage,
                                                          logprobs=logprobs.prompt(first)))
                deltas, answer, last, first_text_at = TextDeltas(), AnswerDeltas(), None, None
                async for chunk in with_first(first, chunks):
                    last = chunk
                    logprobs.add(chunk)
                    if held:
                        continue
                    final = chunk.get("finish_reason") is not None
                    if kind == "chat":
                        new = answer.feed(chunk, final)
                    else:
                        new = [delta] if (delta := deltas.feed(str(chunk.get("text") or ""), final)) else []
                    if not new:
                        continue
                    if first_text_at is None:
                        first_text_at = time.monotonic()
                        self.metrics.ttft.labels(model).observe(first_text_at - t0)
                    for j, delta in enumerate(new):  # the tokens' logprobs ride with the first delta
                        if kind == "chat":
                            yield sse(api_policy.chat_chunk(id_, created, model, index, delta, include_usage=include_usage,
                                                            logprobs=logprobs.take() if j == 0 else None))
                        else:
                            yield sse(api_policy.completion_chunk(id_, created, model, index, delta,
                                                                  include_usage=include_usage,
                                                                  logprobs=logprobs.take() if j == 0 else None))
                if last is None:
                    raise ApiError(errors.WORKER_ERROR, f"the model worker at {addr} ended the answer without output")
                finish = finish_reason(last.get("finish_reason"))
                if kind == "chat":
                    if held and first_text_at is None:
                        first_text_at = time.monotonic()
                        self.metrics.ttft.labels(model).observe(first_text_at - t0)
                    tail = answer.feed(last, final=True) or ([{"content": ""}] if logprobs.pending else [])
                    for j, delta in enumerate(tail):
                        yield sse(api_policy.chat_chunk(id_, created, model, index, delta, include_usage=include_usage,
                                                        logprobs=logprobs.take() if j == 0 else None))
                    calls = last.get("tool_calls") if held else None
                    if calls:
                        for delta in tool_calls.deltas(calls, tools):
                            yield sse(api_policy.chat_chunk(id_, created, model, index, delta,
                                                            include_usage=include_usage))
                        finish = "function_call" if tools.legacy else "tool_calls"
                    yield sse(api_policy.chat_chunk(id_, created, model, index, {}, finish, include_usage=include_usage))
                else:
                    tail = deltas.feed(str(last.get("text") or ""), final=True)
                    yield sse(api_policy.completion_chunk(id_, created, model, index, tail, finish,
                                                          include_usage=include_usage, logprobs=logprobs.take()))
                usage.add(prompt_key, last.get("usage"))
                if first_text_at is not None:
                    self.metrics.decode.labels(model).observe(time.monotonic() - first_text_at)
            if include_usage:
                object_ = "chat.completion.chunk" if kind == "chat" else "text_completion"
                yield sse(api_policy.usage_chunk(id_, created, model, object_, usage))
            self.metrics.tokens(model, usage.prompt_tokens, usage.completion)
            yield api_policy.DONE
            state["completed"] = True
        except Exception as exc:  # noqa: BLE001 - a stream under way can only end with an error event
            err = exc if isinstance(exc, ApiError) else ApiError(errors.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            if isinstance(exc, ApiError):
                log.warning("stream %s for %s ended with an error: %s", id_, model, err.message)
            else:
                log.exception("stream %s for %s failed", id_, model)
            yield err.sse()
            yield api_policy.DONE
            state["completed"] = True

    # --- /v1/chat/completions ----------------------------------------------------------------------------
    async def chat_completions(self, request: Request):
        body = await self.body(request)
        self.label(request, body.get("model"))
        plan = api_policy.chat_request(body)
        addr = await self.resolve(request, plan.model)
        conv = await self.upstream.conv_template(addr, plan.model)
        prompt = api_policy.fastchat_prompt(conv, plan.messages)
        context_len = await self.upstream.context_length(addr, plan.model)
        extra = plan.tools.worker_fields()
        prompt_tokens = await self.upstream.count_tokens(addr, plan.model, prompt, plan.messages, plan.template_kwargs,
                                                         extra)
        max_new = api_policy.max_new_tokens(plan.sampling.max_tokens, context_len, prompt_tokens, plan.model)
        id_ = f"chatcmpl-{shortuuid.random()}"
        jobs = [(0, api_policy.worker_payload(plan.model, plan.sampling, max_new_tokens=max_new,
                                              request_id=f"{id_}-{i}", messages=plan.messages, prompt=prompt,
                                              template_kwargs=plan.template_kwargs, logprobs=plan.logprobs,
                                              choice=i, extra=extra), "")
                for i in range(plan.n)]
        if plan.stream:
            return await self.stream(request, plan.model, addr, jobs, id_, "chat", plan.include_usage, plan.tools)
        results = await self.generate_all(request, plan.model, addr, [job[1] for job in jobs])
        usage = Usage()
        choices = []
        for i, r in enumerate(results):
            usage.add(0, r.get("usage"))
            fields = message_fields(r)
            message, called = tool_calls.message(fields["content"], r.get("tool_calls"), plan.tools)
            message.update({k: v for k, v in fields.items() if k != "content"})  # reasoning_content (DeepSeek's shape)
            choices.append({"index": i, "message": message,
                            "logprobs": (api_policy.chat_logprobs(r["logprob_entries"]) if plan.logprobs is not None
                                         else None),
                            "finish_reason": called or finish_reason(r.get("finish_reason"))})
        self.metrics.tokens(plan.model, usage.prompt_tokens, usage.completion)
        body = ChatCompletionResponse(id=id_, model=plan.model, choices=[], usage=UsageInfo(**usage.as_dict())).model_dump()
        body["choices"] = choices  # FastChat's choice model has no tool_calls, logprobs or reasoning_content
        return JSONResponse(body)

    # --- /v1/completions ---------------------------------------------------------------------------------
    async def completions(self, request: Request):
        body = await self.body(request)
        self.label(request, body.get("model"))
        plan = api_policy.completion_request(body)
        addr = await self.resolve(request, plan.model)
        context_len = await self.upstream.context_length(addr, plan.model)
        id_ = f"cmpl-{shortuuid.random()}"
        jobs = []
        for p, prompt in enumerate(plan.prompts):
            if isinstance(prompt, list):
                used, text = len(prompt), {"prompt_token_ids": prompt}
            else:
                used, text = await self.upstream.count_tokens(addr, plan.model, prompt), {"prompt": prompt}
            max_new = api_policy.max_new_tokens(plan.sampling.max_tokens, context_len, used, plan.model,
                                                default=api_policy.COMPLETIONS_DEFAULT_MAX_TOKENS)
            echoed = prompt if plan.echo else ""  # token-id prompts cannot be echoed (api_policy refuses it)
            prompt_logprobs = plan.logprobs if plan.echo else None
            for i in range(plan.n):
                jobs.append((p, api_policy.worker_payload(plan.model, plan.sampling, max_new_tokens=max_new,
                                                          request_id=f"{id_}-{p * plan.n + i}", logprobs=plan.logprobs,
                                                          prompt_logprobs=prompt_logprobs, choice=i, **text), echoed))
        if plan.stream:
            return await self.stream(request, plan.model, addr, jobs, id_, "completions", plan.include_usage)
        results = await self.generate_all(request, plan.model, addr, [job[1] for job in jobs])
        usage = Usage()
        choices = []
        for k, ((p, _, echoed), r) in enumerate(zip(jobs, results)):
            usage.add(p, r.get("usage"))
            logprobs = None
            if plan.logprobs is not None:
                logprobs = api_policy.CompletionLogprobs().part(r["prompt_logprob_entries"] + r["logprob_entries"])
            choices.append(CompletionResponseChoice(index=k, text=echoed + str(r.get("text") or ""), logprobs=logprobs,
                                                    finish_reason=finish_reason(r.get("finish_reason"))))
        self.metrics.tokens(plan.model, usage.prompt_tokens, usage.completion)
        return JSONResponse(CompletionResponse(id=id_, model=plan.model, choices=choices,
                                               usage=UsageInfo(**usage.as_dict())).model_dump())

    # --- /v1/embeddings ----------------------------------------------------------------------------------
    async def embeddings(self, request: Request, model_name: Optional[str] = None):
        body = await self.body(request)
        self.label(request, body.get("model") or model_name)
        plan = api_policy.embeddings_request(body, model_name)
        addr = await self.resolve(request, plan.model)
        timeout = self.first_chunk_timeout(plan.model)
        data, tokens = [], 0
        for start in range(0, len(plan.inputs), EMBEDDING_BATCH):
            batch = plan.inputs[start:start + EMBEDDING_BATCH]
            payload = {"model": plan.model, "input": batch, "encoding_format": plan.encoding_format}
            result = await unless_disconnected(request, self.upstream.embeddings(addr, payload, timeout))
            vectors = result.get("embedding")
            if not isinstance(vectors, list) or len(vectors) != len(batch):
                raise ApiError(errors.WORKER_ERROR, f"the model worker at {addr} answered no embeddings")
            data += [{"object": "embedding", "embedding": e, "index": start + i} for i, e in enumerate(vectors)]
            tokens += int(result.get("token_num") or 0)
        self.metrics.tokens(plan.model, tokens, 0)
        return JSONResponse(EmbeddingsResponse(data=data, model=plan.model, usage=UsageInfo(
            prompt_tokens=tokens, total_tokens=tokens, completion_tokens=None)).model_dump(exclude_none=True))

    async def engine_embeddings(self, request: Request, model_name: str):
        return await self.embeddings(request, model_name)

    # --- /health, /metrics ---------------------------------------------------------------------------------
    async def health(self):
        try:
            served = set(await self.upstream.list_models(timeout=3.0))
        except ApiError as err:
            message = f"the controller at {self.settings.controller_address} does not answer: {err.message}"
            return JSONResponse({"status": "unhealthy", "controller": "not answering",
                                 **errors.envelope(message, errors.WORKER_UNAVAILABLE.type, "controller_unavailable")},
                                status_code=503)
        self.registered = served
        models = {name: ("registered" if name in served else "missing") for name in self.specs}
        missing = [name for name, state in models.items() if state == "missing"]
        body = {"status": "ok" if not missing else "unhealthy", "controller": "ok", "models": models}
        if not missing:
            return JSONResponse(body)
        message = f"no worker is registered for model{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
        body.update(errors.envelope(message, errors.WORKER_UNAVAILABLE.type, "worker_missing"))
        return JSONResponse(body, status_code=503)

    async def metrics_page(self):
        await self.metrics.refresh_workers(self.upstream, sorted(set(self.specs) | self.registered))
        payload, content_type = self.metrics.exposition()
        return Response(payload, media_type=content_type)


def _body_schema(*models) -> dict:
    schema = models[0].model_json_schema()
    for extra in models[1:]:
        extra_schema = extra.model_json_schema()
        schema.setdefault("properties", {}).update(extra_schema.get("properties", {}))
        schema.setdefault("$defs", {}).update(extra_schema.get("$defs", {}))
    if not schema.get("$defs"):
        schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _inline_refs(schema):
    """OpenAPI wants components, pydantic writes $defs: inline the (small, non-recursive) definitions."""
    defs = schema.pop("$defs", {}) if isinstance(schema, dict) else {}

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(dict(defs[ref.split("/")[-1]]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def install(api_module, dep=None, http_options: dict | None = None) -> BundleApi:
    """Make FastChat's openai_api_server app (module passed in, fastchat_compat.apply_api done) the bundle's API;
    returns the handlers. `http_options`: auth.httpx_options for the calls to the controller and workers."""
    app = api_module.app
    existing = getattr(app.state, "bundle_api", None)
    if existing is not None:  # installed already (tests): only the deployment changes
        existing.configure(dep)
        return existing
    bundle = app.state.bundle_api = BundleApi(api_module, dep, http_options)

    async def check_api_key(auth: Optional[HTTPAuthorizationCredentials] = Depends(api_module.get_bearer_token)):
        keys = bundle.settings.api_keys
        if not keys:
            return None
        if auth is None:
            raise ApiError(errors.INVALID_API_KEY, "missing API key: send the header 'Authorization: Bearer <key>'")
        given = auth.credentials.encode()
        if not any(hmac.compare_digest(given, k.encode()) for k in keys):
            raise ApiError(errors.INVALID_API_KEY, "invalid API key")  # never echo the key
        return auth.credentials

    async def on_api_error(request: Request, exc: ApiError):
        return exc.response()

    async def on_fetch_unavailable(request: Request, exc: WorkerUnavailable):  # FastChat's own /v1/models
        return bundle.upstream.unavailable(exc.url, exc.exc).response()

    async def on_validation_error(request: Request, exc: RequestValidationError):
        return errors.from_validation(list(exc.errors())).response()

    async def on_http_exception(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = ApiError(errors.NOT_FOUND, f"no such endpoint: {request.method} {request.url.path}")
        elif exc.status_code == 405:
            err = ApiError(errors.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on {request.url.path}")
        else:
            kind = errors.Kind(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error",
                               str(exc.status_code), "")
            err = ApiError(kind, str(exc.detail))
        return err.response()

    async def on_client_gone(request: Request, exc: errors.ClientDisconnected):
        request.scope.setdefault("state", {})["bundle_client_gone"] = True
        return Response(status_code=errors.CLIENT_CLOSED_STATUS)

    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return ApiError(errors.INTERNAL, f"internal error: {type(exc).__name__}: {exc}").response()

    app.dependency_overrides[api_module.check_api_key] = check_api_key
    for exc_class, handler in ((ApiError, on_api_error), (WorkerUnavailable, on_fetch_unavailable),
                               (RequestValidationError, on_validation_error),
                               (StarletteHTTPException, on_http_exception), (errors.ClientDisconnected, on_client_gone),
                               (Exception, on_unexpected)):
        app.add_exception_handler(exc_class, handler)

    # FastChat's /api/v1/* bypassed every check; its three generation handlers are replaced by ours.
    app.router.routes[:] = [r for r in app.router.routes
                            if not (getattr(r, "path", "").startswith("/api/") or getattr(r, "path", "") in REPLACED_ROUTES)]
    keyed = [Depends(api_module.check_api_key)]
    for path, endpoint, models in (
            ("/v1/chat/completions", bundle.chat_completions, (ChatCompletionRequest, api_policy.ChatExtras)),
            ("/v1/completions", bundle.completions, (CompletionRequest, api_policy.Extras)),
            ("/v1/embeddings", bundle.embeddings, (EmbeddingsRequest,)),
            ("/v1/engines/{model_name}/embeddings", bundle.engine_embeddings, (EmbeddingsRequest,))):
        extra = _body_schema(*models)
        extra["requestBody"]["content"]["application/json"]["schema"] = _inline_refs(
            extra["requestBody"]["content"]["application/json"]["schema"])
        app.add_api_route(path, endpoint, methods=["POST"], dependencies=keyed, openapi_extra=extra)
    app.add_api_route("/health", bundle.health, methods=["GET"])
    app.add_api_route("/metrics", bundle.metrics_page, methods=["GET"])
    app.add_event_handler("shutdown", bundle.upstream.aclose)
    app.add_middleware(api_policy.BodySizeLimit, limit=api_policy.MAX_BODY_BYTES)
    app.add_middleware(MetricsMiddleware, metrics=bundle.metrics)  # outermost: counts 413s too
    app.openapi_schema = None
    return bundle


def main(argv: list[str] | None = None) -> int:
    args = launch.parser(__doc__).parse_args(argv)
    dep, _ = launch.settings(args)
    try:
        keys = secrets.api_keys(dep.api)
    except secrets.SecretError as exc:
        log.error("cannot start the API server: %s", exc)
        return 2


    from workers.serving import auth, fastchat_compat

    secret = auth.secret(dep)
    # FastChat's own calls (/v1/models) carry the worker secret too
    fastchat_api = fastchat_compat.apply_api(auth.AiohttpShim(secret), auth.CONNECT_TIMEOUT_S)
    controller = launch.controller_url(dep)
    fastchat_api.app_settings.controller_address = controller
    fastchat_api.app_settings.api_keys = keys or None
    install(fastchat_api, dep, auth.httpx_options(secret, hosts.several(dep)))
    log.info("API on http://%s:%d/v1, controller %s, %s", dep.api.host, dep.api.port, controller,
             f"{len(keys)} API key(s) required" if keys else "no API key required")
    launch.serve(fastchat_api.app, launch.bind_address(dep, "api"), dep.api.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
