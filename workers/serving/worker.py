"""The bundle's model worker: FastChat's worker protocol, the bundle's own generation path.

    python -m workers.serving.worker --deployment var/run/deployment.json --model NAME

Like FastChat's own vllm/mlx workers, this subclasses FastChat's BaseModelWorker (registration,
heartbeat, status) and serves the same endpoints (`/worker_generate_stream`, `/worker_generate`,
`/worker_get_embeddings`, `/count_token`, `/worker_get_conv_template`, `/model_details`,
`/worker_get_status`) from an app of its own, because FastChat 0.2.36's ModelWorker picks the
prompt format by folder name, ignores ChatGLM3's turn-end tokens, leaks its slot on errors, keeps
generating for clients that left, and runs embeddings on the event loop.

Here: the prompt is the model's own chat format (engine/prompt.py), generation is the model's own
generate() in a thread, cancelled within one decode step when its client disconnects; every path
frees its slot; the queue is bounded (429) and waits are limited (503 busy). Every setting comes
from the deployment snapshot.
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import sys
import threading
import time
import uuid

from fastapi import FastAPI, Request  # module level: FastAPI resolves the `Request` annotations by name
from fastapi.responses import JSONResponse

from workers.engine import threads
from workers.serving import api_policy, launch

log = logging.getLogger("bundle_worker")
STREAM_MIN_INTERVAL_S = 0.05  # coalesce tokens that arrive faster than this into one chunk
INTERNAL_ERROR = 50001  # FastChat's ErrorCode.INTERNAL_ERROR, which its API server and web UI understand
REGISTER_RETRY_S = 2.0  # between registration attempts while the controller is not up


def error_response(kind, message: str, param: str | None = None, headers: dict | None = None):
    """An error from the one error table (serving/errors.py), in its envelope; FastChat-protocol
    clients also find `text` and `error_code` there."""
    from workers.serving.errors import ApiError

    error = ApiError(kind, message, param, headers)
    return JSONResponse({**error.body(), "text": message, "error_code": kind.status}, status_code=kind.status,
                        headers=error.headers)


# Tests of the error paths set BUNDLE_ALLOW_FAULTS=1; a request may then ask to fail mid-generation.
ALLOW_FAULTS = os.environ.get("BUNDLE_ALLOW_FAULTS") == "1"


def _failing(on_text):
    def fail(text, n):
        raise RuntimeError("injected fault (BUNDLE_ALLOW_FAULTS)")
    return fail


class LogprobFeed:
    """The logprob fields of a job's chunks (see the contract in workers/serving/api_server.py): each chunk
    carries the entries of the tokens since the chunk before ("token_logprobs": {"offset", "content"}), the
    first one also the prompt's ("prompt_logprobs"), so skipped text chunks lose no entry."""

    def __init__(self, served, job):
        self.served, self.job, self.sent, self.prompt_sent = served, job, 0, False

    def upto(self, n: int) -> dict:
        out = {}
        if self.job.prompt_entries is not None and not self.prompt_sent:
            out["prompt_logprobs"] = self.served.logprob_json(self.job.prompt_entries)
            self.prompt_sent = True
        if self.job.logprobs is not None:
            entries = self.job.chosen_logprobs[self.sent:n]
            out["token_logprobs"] = {"offset": self.sent, "content": self.served.logprob_json(entries)}
            self.sent += len(entries)
        return out


def build_app(worker):
    """The worker's HTTP endpoints (FastChat's worker protocol)."""
    from fastapi.responses import Response

    from workers.serving.ending_stream import EndingStreamingResponse

    from workers.engine.loader import release_freed_memory
    from workers.engine.served_model import BadRequest
    from workers.serving import errors
    from workers.serving.admission import Busy, ClientGone, QueueFull

    app = FastAPI(title=f"bundle worker {worker.model_names[0]}")
    served = worker.served

    async def read_params(request: Request) -> dict:
        try:
            params = await request.json()
        except ValueError:
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(params, dict):
            raise BadRequest("the request body must be a JSON object")
        return params

    @app.exception_handler(BadRequest)
    async def on_bad_request(request, exc: BadRequest):
        return error_response(errors.TABLE[exc.code], str(exc), exc.param)

    @app.exception_handler(QueueFull)
    async def on_queue_full(request, exc: QueueFull):
        return error_response(errors.QUEUE_FULL, f"model {worker.model_names[0]} is overloaded: {exc}; retry after "
                                                 f"{exc.retry_after_s} s", headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(Busy)
    async def on_busy(request, exc: Busy):
        return error_response(errors.WORKER_BUSY, f"model {worker.model_names[0]} is busy: {exc} (all "
                                                  f"{worker.admission.slots} slots stayed taken)")

    @app.exception_handler(Exception)
    async def on_failure(request, exc: Exception):
        log.error("%s failed: %s: %s", request.url.path, type(exc).__name__, exc)
        return error_response(errors.INTERNAL, f"the worker failed: {type(exc).__name__}: {exc}")

    @app.exception_handler(ClientGone)
    async def on_client_gone(request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it

    async def admitted(request: Request, params: dict, work):
        """Run `work(params)` in a thread once a slot is free; the thread frees the slot when done."""
        await worker.admission.acquire(request.is_disconnected)
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, work, params)

        def done(_):
            worker.admission.release(time.monotonic() - start)
            # Each request frees tensors (KV cache grown step by step, logits) that glibc keeps in
            # its per-thread arenas, so RSS grows over a long run until they are trimmed
            # (docs/benchmarks.md, 'Figures behind constants in the code'). Off the event loop; nobody waits for it.
            try:
                loop.run_in_executor(None, release_freed_memory, False)
            except RuntimeError:  # the program is ending (its executor or loop shut): its memory goes with it
                pass

        future.add_done_callback(done)
        return future

    async def until_done_or_gone(request: Request, future, cancel=None):
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                return future.result()
            if await request.is_disconnected():
                if cancel is not None:
                    cancel.set()
                raise ClientGone()

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request):
        params = await read_params(request)
        job, _ = await asyncio.to_thread(served.job, params)
        chunks: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        rid = params.get("request_id") or uuid.uuid4().hex[:8]

        def work(_params):
            try:
                result = worker.run_job(rid, job, lambda text, n: loop.call_soon_threadsafe(
                    chunks.put_nowait, ("text", text, n)), params)
                loop.call_soon_threadsafe(chunks.put_nowait, ("done", result, None))
            except Exception as exc:  # report it on the stream; the slot is freed by admitted()
                log.exception("request %s failed", rid)
                loop.call_soon_threadsafe(chunks.put_nowait, ("error", exc, None))

        await admitted(request, params, work)

        async def stream():
            last_sent = 0.0  # each chunk carries the whole text so far: skipping one loses nothing
            logprobs = LogprobFeed(served, job)  # and the logprobs of the tokens since the chunk before
            while True:
                kind, value, n = await chunks.get()
                if kind == "text":
                    if time.monotonic() - last_sent >= STREAM_MIN_INTERVAL_S:
                        yield worker.chunk(value, job, n, None, logprobs.upto(n), final=False)
                        last_sent = time.monotonic()
                elif kind == "done":
                    content, calls = served.tool_calls(params, value.text)
                    yield worker.chunk(content, job, value.completion_tokens, value.finish_reason,
                                       logprobs.upto(value.completion_tokens), calls)
                    return
                else:
                    message = f"generation failed: {type(value).__name__}: {value}"
                    yield (json.dumps({"text": message, "error_code": INTERNAL_ERROR}) + "\0").encode()
                    return

        async def stop_generating(_scope):  # a client that left, or the end: either way nothing more to generate
            job.cancel.set()

        return EndingStreamingResponse(stream(), stop_generating)

    @app.post("/worker_generate")
    async def generate_once(request: Request):
        params = await read_params(request)
        job, _ = await asyncio.to_thread(served.job, params)
        rid = params.get("request_id") or uuid.uuid4().hex[:8]
        future = await admitted(request, params, lambda p: worker.run_job(rid, job, None, p))
        result = await until_done_or_gone(request, future, job.cancel)
        content, calls = served.tool_calls(params, result.text)
        return JSONResponse(json.loads(worker.chunk(content, job, result.completion_tokens, result.finish_reason,
                                                    LogprobFeed(served, job).upto(result.completion_tokens), calls)[:-1]))

    @app.post("/worker_get_embeddings")
    async def embeddings(request: Request):
        params = await read_params(request)
        future = await admitted(request, params, served.embed)
        return JSONResponse(await until_done_or_gone(request, future))

    @app.post("/count_token")
    async def count_token(request: Request):
        params = await read_params(request)
        return {"count": await asyncio.to_thread(served.count_tokens, params), "error_code": 0}

    @app.post("/worker_cancel")
    async def cancel(request: Request):
        """Stop a running generation by its request_id (the web page's Stop button)."""
        params = await read_params(request)
        job = worker.jobs.get(str(params.get("request_id")))
        if job is not None:
            job.cancel.set()
        return {"cancelled": job is not None}

    @app.post("/worker_get_status")
    async def status(request: Request):
        return worker.get_status()

    @app.post("/worker_get_conv_template")
    async def conv_template(request: Request):
        return worker.get_conv_template()

    @app.post("/model_details")
    async def model_details(request: Request):
        return {"context_length": served.context_len, "max_tokens_default": served.max_tokens_default,
                "sampling": served.sampling, "batching": served.batching_state()}

    return app


MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> None:
    """At most `arenas` glibc malloc arenas (like MALLOC_ARENA_MAX=2). By default glibc gives up to
    8 x cores arenas to the threads that allocate (generation threads, tokenizer, uvicorn); each keeps
    pages that a few small live blocks pin, so freed request memory was spread over ~30 heaps that
    malloc_trim cannot empty (the INT8 worker kept growing by ~600 MiB over a soak run with trimming
    alone). No-op outside glibc."""
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


def make_worker_class():
    import requests
    from fastchat.serve.base_model_worker import BaseModelWorker

    from workers.serving import auth

    class BundleWorker(BaseModelWorker):
        """FastChat's registration, heartbeat and status; the bundle's generation and admission."""

        def __init__(self, controller_addr, worker_addr, spec, served, conv_template_name):
            self.served = served
            from workers.serving.admission import Admission

            self.admission = Admission(spec.limit_concurrency, spec.max_queue, spec.queue_timeout_s)
            self.jobs: dict = {}  # request id -> running Job
            super().__init__(controller_addr, worker_addr, uuid.uuid4().hex[:8], str(served.folder), spec.names,
                             spec.limit_concurrency, conv_template=conv_template_name)
            self.tokenizer, self.context_len = served.tokenizer, served.context_len

        def register_to_controller(self):
            """FastChat's registration is one bare POST that kills the worker when the controller is not up yet
            (supervisord starts every program at once): retry, with a log line, until it answers."""
            attempt = 0
            while True:
                attempt += 1
                try:
                    return super().register_to_controller()
                except auth.RegistrationRefused as exc:
                    log.error("%s (HTTP 401, attempt %d); this worker is not registered. Give every host the same "
                              "worker secret; retrying in %.0f s", exc, attempt, auth.REFUSED_RETRY_S)
                    time.sleep(auth.REFUSED_RETRY_S)
                except (requests.exceptions.RequestException, AssertionError) as exc:
                    log.warning("controller at %s is not reachable yet (attempt %d: %s); retrying in %.0f s",
                                self.controller_addr, attempt, type(exc).__name__, REGISTER_RETRY_S)
                    time.sleep(REGISTER_RETRY_S)

        def make_conv_template(self, conv_template=None, model_path=None):
            from fastchat.conversation import get_conv_template

            # Only for clients that build prompts themselves (FastChat's web UI shows its role
            # names); the bundle's API and web UI send messages, rendered by the model's own format.
            return get_conv_template(conv_template or "raw")

        def get_queue_length(self):
            return self.admission.queue_length

        def run_job(self, rid, job, on_text, params=None):
            self.jobs[rid] = job  # so /worker_cancel can stop it
            if ALLOW_FAULTS and (params or {}).get("bundle_fault") == "after-first-token":
                on_text = _failing(on_text)
            try:
                result = self.served.generate(job, on_text)
            finally:
                self.jobs.pop(rid, None)
            speed = result.completion_tokens / result.decode_s if result.decode_s > 0 else 0.0
            log.info("request %s: %d prompt (%d reused) + %d new tokens, %s, first token %.2f s, %.1f tok/s", rid,
                     len(job.prompt_ids), result.reused_tokens, result.completion_tokens, result.finish_reason,
                     result.first_token_s or 0.0, speed)
            return result

        @staticmethod
        def chunk(text: str, job, completion_tokens: int, finish_reason: str | None,
                  logprobs: dict | None = None, tool_calls: list[dict] | None = None, final: bool = True) -> bytes:
            """One stream chunk, with the job's logprob fields (LogprobFeed). For a reasoning model's chat answer
            (`job.thinking`, engine/reasoning.py) `text` has its markers balanced and `reasoning_content` /
            `content` split it; `final=False` while it may still grow (a marker being written is held back)."""
            if finish_reason is not None:  # the worker protocol's reasons are OpenAI's: a cancelled answer stopped
                finish_reason = api_policy.finish_reason(finish_reason)
            prompt_tokens = len(job.prompt_ids) - job.added_prefix  # the client's prompt, as it sent it
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}
            data = {"text": text, "error_code": 0, "usage": usage, "finish_reason": finish_reason, **(logprobs or {})}
            if job.thinking is not None:
                data["reasoning_content"], data["content"] = job.thinking.split(text, final)
                data["text"] = job.thinking.text(text)
            if tool_calls:
                data["tool_calls"] = tool_calls  # the calls read from the answer; `text` is what else it said
            return (json.dumps(data, ensure_ascii=False) + "\0").encode()

    return BundleWorker


def main(argv: list[str] | None = None) -> int:
    args = launch.parser(__doc__, with_model=True).parse_args(argv)
    dep, spec = launch.settings(args)
    from workers.config import deployment, rules

    limit_malloc_arenas()  # before any thread allocates
    n_threads = rules.shared_cores(dep) if spec.shared else spec.threads
    threads.configure(n_threads, spec.cpu_cores, shared=spec.shared)  # before torch is imported

    from workers.models import check as model_check
    from workers.models.sources import model_dir

    folder = model_dir(spec.source)
    incomplete = model_check.problems(folder, spec.source.modelscope)
    if incomplete:
        log.error("cannot serve %s: %s", folder, "; ".join(incomplete))
        return 2

    from workers.serving import auth, fastchat_compat

    secret = auth.secret(dep)
    fastchat_compat.apply_worker(auth.RequestsShim(secret, who="worker"))  # registration and heartbeats carry it

    from workers.engine.loader import UnsupportedBackend, load_model
    from workers.engine.prompt import PromptError
    from workers.engine.served_model import ServedModel

    log.info("starting worker %s: backend=%s threads=%s cores=%s", spec.names, spec.backend,
             f"shared, up to {n_threads}" if spec.shared else spec.threads, spec.cpu_cores or "all")
    try:
        model, tokenizer = load_model(folder, spec.backend, int8=spec.int8, trust_remote_code=spec.trust_remote_code,
                                      n_threads=n_threads, shared_threads=spec.shared,
                                      concurrency=spec.limit_concurrency if spec.batching else 1)
        threads.apply_to_torch(n_threads)  # after loading: ITREX resets the thread count
        share = None
        if spec.shared:  # next to the snapshot: one folder per running deployment
            from workers.engine.core_share import CoreShare

            snapshot = args.deployment or deployment.snapshot_path()
            share = CoreShare(snapshot.parent / "demand", spec.program, n_threads)
        served = ServedModel.build(spec, folder, model, tokenizer, share)
    except (UnsupportedBackend, PromptError) as exc:
        log.error("cannot serve %s: %s", folder, exc)
        return 2
    host = launch.bind_address(dep, spec)  # its host's address (127.0.0.1 without hosts:), never all interfaces
    worker = make_worker_class()(launch.controller_url(dep), launch.worker_url(dep, spec), spec, served,
                                 spec.conv_template)
    app = build_app(worker)
    auth.install_server(app, secret)

    # Registration retries until the controller answers (register_to_controller), so not on the event loop.
    threading.Thread(target=worker.init_heart_beat, name="register", daemon=True).start()

    log.info("worker ready: %s (context length %s)", worker.model_names, worker.context_len)
    launch.serve(app, host, spec.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
