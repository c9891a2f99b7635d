"""Soak benchmark of a running bundle: many mixed requests, then 5xx count, worst queue length and RSS.

    python -m workers.tools.soak [--profile default] [--requests 1000] [--concurrency 6] [--max-tokens 16]
                                 [--deadline-s 1800] [--seed 0]

Not a test: it loads a bundle that runs (scripts/start_all.sh) with a fixed, seeded mix of what clients do:
normal chat (streamed and not), completions, embeddings, valid odd shapes (content parts, token-id prompts
and embedding inputs, max_completion_tokens), client drops (a stream closed after its first chunk; a
non-streaming request given up after 1-2 s), over-long prompts (expect 400), bad shapes (expect 4xx), a few
requests without max_tokens (the model's default length applies), and bursts above a worker's queue
(slots + max_queue + 4 at once: expect 429 with Retry-After, after which each refused client waits that long
and retries once). Every few seconds it samples each worker's queue_length (POST /worker_get_status) and the
RSS of each worker process (and the API's), found through the bundle's supervisord (--run-dir), else by the
process listening on the worker's port.

Prints counts by status, the 5xx count (must be 0), the worst queue length per worker and RSS at start, peak
and end per process; writes JSON and Markdown under var/reports/soak/. Exits 1 on any 5xx, transport error,
a worker queue that does not drain after the run (a leaked slot), or a server that died or restarted.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil
from tqdm import tqdm

from workers.config import deployment, hosts, secrets
from workers.config.paths import reports_dir, run_dir
from workers.config.schema import Deployment, ModelSpec
from workers.serving import errors as api_errors
from workers.tools.api_client import profile_api, openai_client

REQUEST_TIMEOUT_S = 300.0
OVERLONG_WORDS = 9000  # ~9k tokens: over the 8k context of the embedded model (--overlong-words for larger ones)
TOPICS = ["cats", "the moon", "bread", "rivers", "a lighthouse", "chess", "winter", "bees", "trains", "volcanoes",
          "tea", "a violin", "maps", "gardens", "clocks", "whales"]
TEMPLATES = ["Tell me about {t}.", "Write one sentence about {t}.", "What is interesting about {t}?",
             "Give me a short fact about {t}.", "Describe {t} to a child.", "List three words about {t}."]
PARAGRAPH = ("The old town sat between two hills, and every morning the fog rolled down from the northern ridge, "
             "filling the streets until the bakers opened their doors and the smell of bread pushed it back. ")

# kind -> weight of the seeded mix (bursts and requests without max_tokens are counted separately)
MIX = {
    "chat": 18, "chat_stream": 16, "completion": 7, "completion_stream": 5, "embeddings": 8, "shape_ok": 6,
    "drop_stream": 6, "drop_timeout": 6, "overlong": 7, "bad_shape": 12,
}
EXPECTED = {  # kind -> what counts as the expected outcome
    "chat": "200", "chat_stream": "200", "completion": "200", "completion_stream": "200", "embeddings": "200",
    "shape_ok": "200", "no_max_tokens": "200", "drop_stream": "200 (closed after the first chunk)",
    "drop_timeout": "client gave up", "overlong": "400", "bad_shape": "4xx", "burst": "200 or 429",
}
# Any kind may meet a full queue while a burst is under way: 429 with Retry-After, then one retry.


@dataclass
class Outcome:
    kind: str
    model: str
    status: str  # an HTTP status, "200/stream-error:<code>", "client-timeout", "transport:<Exception>"
    seconds: float
    variant: str = ""
    expected: bool = True
    detail: str = ""
    retry_after: str | None = None
    completion_tokens: int | None = None
    retry: bool = False  # the one retry after a 429, Retry-After honoured


def status_class(status: str) -> str:
    """'5xx' for anything the server got wrong (an HTTP 5xx, an error event >= 500 in a stream)."""
    if status.startswith("200/stream-error:"):
        kind = api_errors.TABLE.get(status.split(":", 1)[1])
        return "5xx" if kind is None or kind.status >= 500 else "4xx"
    if status.isdigit():
        return f"{status[0]}xx"
    return status.split(":")[0]


# --- the requests ------------------------------------------------------------------------------------------
class Client:
    def __init__(self, api: str, key: str, max_tokens: int):
        self.api, self.key, self.max_tokens = api, key, max_tokens
        self.openai = openai_client(api, key, max_retries=0, timeout=REQUEST_TIMEOUT_S)
        self.http = httpx.Client(base_url=api, timeout=REQUEST_TIMEOUT_S, trust_env=False,
                                 headers={"Authorization": f"Bearer {key}"})

    def close(self) -> None:
        self.http.close()
        self.openai.close()


def _prompt(rng: random.Random) -> str:
    text = rng.choice(TEMPLATES).format(t=rng.choice(TOPICS)) + f" (#{rng.randrange(10_000)})"
    r = rng.random()
    if r < 0.2:  # a longer prompt, 100-700 tokens
        text = PARAGRAPH * rng.randint(3, 18) + "\n" + text
    return text


def _messages(rng: random.Random) -> list[dict]:
    msgs = [{"role": "user", "content": _prompt(rng)}]
    if rng.random() < 0.25:  # a later turn of a chat: the prefix cache's case
        topic = rng.choice(TOPICS[:4])
        msgs = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": f"Tell me about {topic}."},
                {"role": "assistant", "content": f"{topic.capitalize()} are a common topic; here is a short note."},
                *msgs]
    return msgs


def _error_status(exc) -> tuple[str, str | None, str]:
    import openai

    if isinstance(exc, openai.APIStatusError):
        return str(exc.status_code), exc.response.headers.get("retry-after"), str(exc.message)[:200]
    if isinstance(exc, openai.APITimeoutError):
        return "client-timeout", None, ""
    if isinstance(exc, openai.APIError) and getattr(exc, "request", None) is not None and exc.body is not None:
        code = exc.code or (exc.body.get("code") if isinstance(exc.body, dict) else None)  # an error event in a stream
        return f"200/stream-error:{code}", None, str(exc.message)[:200]
    if isinstance(exc, openai.APIConnectionError):
        return f"transport:{type(exc.__cause__ or exc).__name__}", None, str(exc.__cause__ or exc)[:200]
    return f"transport:{type(exc).__name__}", None, str(exc)[:200]


def bad_shapes(model: str) -> list[tuple[str, str, object]]:
    """(variant, path, body): each answered with a 4xx naming the problem."""
    m = model
    user = [{"role": "user", "content": "hi"}]
    return [
        ("messages-as-string", "/chat/completions", {"model": m, "messages": "hello", "max_tokens": 4}),
        ("messages-missing", "/chat/completions", {"model": m, "max_tokens": 4}),
        ("messages-empty", "/chat/completions", {"model": m, "messages": [], "max_tokens": 4}),
        ("message-without-role", "/chat/completions", {"model": m, "messages": [{"content": "hi"}], "max_tokens": 4}),
        ("message-bad-role", "/chat/completions", {"model": m, "messages": [{"role": "robot", "content": "hi"}]}),
        ("image-part", "/chat/completions", {"model": m, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}),
        ("tools", "/chat/completions", {"model": m, "messages": user, "max_tokens": 4, "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}),
        ("response-format-json", "/chat/completions", {"model": m, "messages": user, "max_tokens": 4,
                                                       "response_format": {"type": "json_object"}}),
        ("logit-bias", "/chat/completions", {"model": m, "messages": user, "max_tokens": 4, "logit_bias": {"1": 5}}),
        ("seed", "/chat/completions", {"model": m, "messages": user, "max_tokens": 4, "seed": 1}),
        ("temperature-out-of-range", "/chat/completions", {"model": m, "messages": user, "temperature": 5}),
        ("presence-penalty-out-of-range", "/chat/completions", {"model": m, "messages": user, "presence_penalty": 3}),
        ("max-tokens-negative", "/chat/completions", {"model": m, "messages": user, "max_tokens": -1}),
        ("max-tokens-string", "/chat/completions", {"model": m, "messages": user, "max_tokens": "many"}),
        ("n-too-large", "/chat/completions", {"model": m, "messages": user, "max_tokens": 4, "n": 1000}),
        ("stop-not-strings", "/chat/completions", {"model": m, "messages": user, "max_tokens": 4, "stop": 5}),
        ("unknown-model", "/chat/completions", {"model": "no-such-model", "messages": user, "max_tokens": 4}),
        ("not-json", "/chat/completions", b"{this is not json"),
        ("body-is-list", "/chat/completions", [1, 2, 3]),
        ("prompt-dict-list", "/completions", {"model": m, "prompt": [{}], "max_tokens": 4}),
        ("prompt-null-list", "/completions", {"model": m, "prompt": [None], "max_tokens": 4}),
        ("prompt-empty", "/completions", {"model": m, "prompt": [], "max_tokens": 4}),
        ("completion-logprobs", "/completions", {"model": m, "prompt": "hi", "max_tokens": 4, "logprobs": 2}),
        ("embedding-input-empty", "/embeddings", {"model": m, "input": []}),
        ("embedding-input-dicts", "/embeddings", {"model": m, "input": [{"a": 1}]}),
        ("embedding-token-out-of-vocab", "/embeddings", {"model": m, "input": [[10**9]]}),
        ("embedding-dimensions", "/embeddings", {"model": m, "input": "hi", "dimensions": 8}),
    ]


def good_shapes(model: str, max_tokens: int) -> list[tuple[str, str, dict]]:
    """(variant, path, body): unusual but valid OpenAI shapes, answered 200."""
    m, k = model, max_tokens
    return [
        ("content-parts", "/chat/completions", {"model": m, "max_tokens": k, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Say hello"}, {"type": "text", "text": "to the moon."}]}]}),
        ("max-completion-tokens", "/chat/completions", {"model": m, "max_completion_tokens": k,
                                                        "messages": [{"role": "user", "content": "Count to five."}]}),
        ("token-id-prompt", "/completions", {"model": m, "prompt": [1, 504, 2563, 314, 253], "max_tokens": k}),
        ("token-id-prompts", "/completions", {"model": m, "prompt": [[1, 504, 2563], [1, 314, 253]], "max_tokens": k}),
        ("token-id-embedding", "/embeddings", {"model": m, "input": [[1, 504, 2563, 314]]}),
        ("prompt-list", "/completions", {"model": m, "prompt": ["Once upon", "In a land"], "max_tokens": k}),
        ("penalties", "/chat/completions", {"model": m, "max_tokens": k, "presence_penalty": 0.5,
                                            "frequency_penalty": -0.5,
                                            "messages": [{"role": "user", "content": "Name some fruit."}]}),
    ]


def warm_up(c: Client, models: list[str]) -> list[Outcome]:
    """A few requests per model before the reference RSS: the weights get paged in, the kernels' workspace
    allocated, so the run's RSS figures show what serving adds, not what a first request always costs."""
    out = []
    for model in models:
        for kind, seed in (("chat", 1), ("chat_stream", 2), ("embeddings", 3), ("completion", 4)):
            o = run_one(c, kind, model, random.Random(seed), OVERLONG_WORDS)
            o.kind, o.variant = "warm-up", kind
            out.append(o)
        long_prompt = [{"role": "user", "content": PARAGRAPH * 18 + "Summarise this."}]
        t0 = time.perf_counter()
        try:
            c.openai.chat.completions.create(model=model, messages=long_prompt, max_tokens=c.max_tokens)
            status, detail = "200", ""
        except Exception as exc:  # noqa: BLE001
            status, _, detail = _error_status(exc)
        out.append(Outcome("warm-up", model, status, time.perf_counter() - t0, "long prompt", status == "200", detail))
    return out


def run_one(c: Client, kind: str, model: str, rng: random.Random, overlong_words: int) -> Outcome:
    """One request of the mix; never raises."""
    k = c.max_tokens
    temperature = rng.choice([0.0, 0.7])
    t0 = time.perf_counter()
    variant, detail, retry_after, tokens = "", "", None, None
    status = "200"
    try:
        if kind == "chat":
            r = c.openai.chat.completions.create(model=model, messages=_messages(rng), max_tokens=k,
                                                 temperature=temperature)
            tokens = r.usage.completion_tokens if r.usage else None
        elif kind == "no_max_tokens":
            r = c.openai.with_options(timeout=3 * REQUEST_TIMEOUT_S).chat.completions.create(
                model=model, messages=[{"role": "user", "content": _prompt(rng)}], temperature=temperature)
            tokens = r.usage.completion_tokens if r.usage else None
            detail = f"finish_reason {r.choices[0].finish_reason}"
        elif kind in ("chat_stream", "drop_stream"):
            stream = c.openai.chat.completions.create(model=model, messages=_messages(rng),
                                                      max_tokens=k if kind == "chat_stream" else 4 * k,
                                                      temperature=temperature, stream=True,
                                                      stream_options={"include_usage": True})
            try:
                for chunk in stream:
                    if kind == "drop_stream":
                        variant = "closed after the first chunk"
                        break
                    if getattr(chunk, "usage", None):
                        tokens = chunk.usage.completion_tokens
            finally:
                stream.close()
        elif kind == "completion":
            r = c.openai.completions.create(model=model, prompt=_prompt(rng), max_tokens=k, temperature=temperature)
            tokens = r.usage.completion_tokens if r.usage else None
        elif kind == "completion_stream":
            stream = c.openai.completions.create(model=model, prompt=_prompt(rng), max_tokens=k,
                                                 temperature=temperature, stream=True)
            try:
                for _ in stream:
                    pass
            finally:
                stream.close()
        elif kind == "embeddings":
            n = rng.randint(1, 3)
            c.openai.embeddings.create(model=model, input=[_prompt(rng) for _ in range(n)])
        elif kind == "drop_timeout":
            timeout = rng.uniform(1.0, 2.0)
            variant = f"client timeout {timeout:.1f} s"
            c.openai.with_options(timeout=timeout).chat.completions.create(
                model=model, messages=_messages(rng), max_tokens=8 * k, temperature=temperature)
            detail = "answered before the client gave up"
        elif kind == "overlong":
            long_text = " ".join(rng.choice(TOPICS).split()[0] for _ in range(overlong_words))
            variant = rng.choice(["chat", "completion", "embeddings", "max-tokens-past-context"])
            if variant == "chat":
                c.openai.chat.completions.create(model=model, messages=[{"role": "user", "content": long_text}],
                                                 max_tokens=k)
            elif variant == "completion":
                c.openai.completions.create(model=model, prompt=long_text, max_tokens=k)
            elif variant == "embeddings":
                c.openai.embeddings.create(model=model, input=[long_text])
            else:
                c.openai.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=10**6)
        elif kind in ("bad_shape", "shape_ok"):
            shapes = bad_shapes(model) if kind == "bad_shape" else good_shapes(model, k)
            variant, path, body = rng.choice(shapes)
            if isinstance(body, bytes):
                r = c.http.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                r = c.http.post(path, json=body)
            status = str(r.status_code)
            if r.status_code != 200:
                detail = r.text[:200]
        else:
            raise ValueError(f"unknown kind {kind}")
    except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
        status, retry_after, detail = _error_status(exc)
    seconds = time.perf_counter() - t0
    if kind == "drop_timeout" and status == "client-timeout":
        variant += " (gave up)"
    return Outcome(kind, model, status, seconds, variant, _expected(kind, status), detail, retry_after, tokens)


def _expected(kind: str, status: str) -> bool:
    if kind == "drop_timeout":
        return status in ("client-timeout", "200")
    if kind == "overlong":
        return status == "400"
    if kind == "bad_shape":
        return status_class(status) == "4xx"
    if kind == "burst":
        return status in ("200", "429")
    return status == "200"


def burst(c: Client, spec: ModelSpec, size: int, rng: random.Random, watch) -> list[Outcome]:
    """`size` requests at once to one model: those beyond slots + max_queue get 429; each waits Retry-After
    and retries once."""
    model = spec.names[0]
    barrier = threading.Barrier(size)
    k = min(4, c.max_tokens)
    prompts = [_prompt(random.Random(rng.random())) for _ in range(size)]

    def one(i: int) -> list[Outcome]:
        out = []
        barrier.wait()
        for attempt in ("burst", "burst_retry"):
            t0 = time.perf_counter()
            try:
                r = c.openai.chat.completions.create(model=model, messages=[{"role": "user", "content": prompts[i]}],
                                                     max_tokens=k, temperature=0.0)
                status, retry_after, detail, tokens = "200", None, "", r.usage.completion_tokens if r.usage else None
            except Exception as exc:  # noqa: BLE001 - recorded
                (status, retry_after, detail), tokens = _error_status(exc), None
            o = Outcome("burst", model, status, time.perf_counter() - t0, f"burst of {size}",
                        _expected("burst", status), detail, retry_after, tokens, retry=attempt == "burst_retry")
            if status == "429" and not retry_after:
                o.expected, o.detail = False, "429 without Retry-After; " + o.detail
            out.append(o)
            if status != "429":
                break
            time.sleep(min(float(retry_after or 2), 120.0))  # honour Retry-After, once
        return out

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(spec, stop), daemon=True)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(size) as pool:
            return [o for os_ in pool.map(one, range(size)) for o in os_]
    finally:
        stop.set()
        watcher.join()


# --- sampling the servers -------------------------------------------------------------------------------
@dataclass
class Proc:
    name: str
    pid: int
    cold_rss: int = 0  # before the warm-up (weights not all paged in yet, no workspace)
    start_rss: int = 0  # after the warm-up: the reference of the run
    peak_rss: int = 0
    end_rss: int = 0
    gone: bool = False
    restarted_as: int | None = None
    samples: list = field(default_factory=list)  # (t, rss)


def _listener_pid(port: int) -> int | None:
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except (psutil.Error, OSError):
        pass
    return None


def _cmdline_pid(needle: list[str]) -> int | None:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if all(any(n == part for part in cmd) for n in needle):
            found.append(p.info["pid"])
    return found[0] if len(found) == 1 else None


def find_pids(dep: Deployment, run: Path) -> tuple[dict[str, int], str]:
    """program -> pid for each worker and the API, and how they were found."""
    wanted = {m.program: m.port for m in dep.models}
    wanted["api"] = dep.api.port
    try:  # the bundle's own supervisord, if this run folder is the bundle of this deployment
        from workers.ops import supervisor_client

        _, running = deployment.read_snapshot(run / deployment.SNAPSHOT_NAME)
        if [m.port for m in running.models] == [m.port for m in dep.models] and running.api.port == dep.api.port:
            infos = supervisor_client.proxy(run).supervisor.getAllProcessInfo()
            pids = {i["name"]: i["pid"] for i in infos if i["name"] in wanted and i["pid"]}
            if set(pids) == set(wanted):
                return pids, f"supervisord RPC ({run})"
    except Exception:  # noqa: BLE001, S110 - any failure: fall back to the ports
        pass
    pids, how = {}, "the process listening on each port"
    for name, port in wanted.items():
        pid = _listener_pid(port)
        if pid is None and name != "api":
            pid = _cmdline_pid(["workers.serving.worker", "--model", name])
            how = "listening port / --model in the command line"
        if pid is not None:
            pids[name] = pid
    return pids, how


def rss(pid: int) -> int | None:
    try:
        p = psutil.Process(pid)
        return p.memory_info().rss + sum(ch.memory_info().rss for ch in p.children(recursive=True))
    except psutil.Error:
        return None


class Sampler:
    def __init__(self, dep: Deployment, run: Path, interval_s: float):
        self.dep, self.run, self.interval_s = dep, run, interval_s
        try:  # internal calls carry the deployment's worker secret, where it has one
            from workers.serving import auth

            headers = auth.headers(secrets.worker_secret(dep))
        except (ImportError, secrets.SecretError):
            headers = {}
        self.http = httpx.Client(timeout=3.0, trust_env=False, headers=headers)
        self.controller = hosts.controller_url(dep)
        self.addresses = self._addresses()
        pids, self.pids_found_by = find_pids(dep, run)
        self.procs = {name: Proc(name, pid) for name, pid in pids.items()}
        self.queue_max = {m.program: 0 for m in dep.models}
        self.queue_samples: dict[str, list] = {m.program: [] for m in dep.models}
        self.status_errors = collections.Counter()
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def _addresses(self) -> dict[str, str]:
        """program -> worker address: from the controller where registered, else the deployment's port."""
        out = {}
        for m in self.dep.models:
            addr = ""
            try:
                addr = self.http.post(f"{self.controller}/get_worker_address", json={"model": m.names[0]}).json()["address"]
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            out[m.program] = addr or hosts.worker_url(self.dep, m)
        return out

    def queue(self, spec: ModelSpec) -> int | None:
        try:
            q = int(self.http.post(f"{self.addresses[spec.program]}/worker_get_status", json={}).json()["queue_length"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            self.status_errors[spec.program] += 1
            return None
        with self._lock:
            self.queue_max[spec.program] = max(self.queue_max[spec.program], q)
            self.queue_samples[spec.program].append((round(time.monotonic() - self.t0, 1), q))
        return q

    def sample_rss(self) -> None:
        now = round(time.monotonic() - self.t0, 1)
        for proc in self.procs.values():
            value = rss(proc.pid)
            if value is None:
                proc.gone = True
                continue
            proc.start_rss = proc.start_rss or value
            proc.peak_rss = max(proc.peak_rss, value)
            proc.end_rss = value
            proc.samples.append((now, value))

    def cold(self) -> None:
        for proc in self.procs.values():
            proc.cold_rss = rss(proc.pid) or 0

    def sample(self) -> None:
        for m in self.dep.models:
            self.queue(m)
        self.sample_rss()

    def watch_burst(self, spec: ModelSpec, stop: threading.Event) -> None:
        while not stop.is_set():
            self.queue(spec)
            stop.wait(0.25)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def check_restarts(self) -> None:
        now, _ = find_pids(self.dep, self.run)
        for name, proc in self.procs.items():
            if now.get(name) not in (None, proc.pid):
                proc.restarted_as = now[name]

    def drain(self, timeout_s: float) -> dict[str, int | None]:
        """Wait until every worker's queue is 0 (a leaked slot never drains); the last value per worker."""
        deadline = time.monotonic() + timeout_s
        last = {}
        while True:
            last = {m.program: self.queue(m) for m in self.dep.models}
            if all(v == 0 for v in last.values()) or time.monotonic() > deadline:
                return last
            time.sleep(1)


# --- the run -------------------------------------------------------------------------------------------
def plan(requests: int, models: list[ModelSpec], rng: random.Random, bursts: int, no_max: int,
         burst_sizes: dict[str, int]) -> tuple[list[tuple[str, str]], list[tuple[float, ModelSpec]]]:
    """The seeded schedule: (kind, model) items for the pool, and (fraction of progress, model) bursts."""
    burst_plan = [((i + 1) / (bursts + 1), models[i % len(models)]) for i in range(bursts)]
    in_bursts = sum(burst_sizes[m.program] for _, m in burst_plan)
    rest = max(0, requests - in_bursts - no_max)
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=rest) + ["no_max_tokens"] * no_max
    rng.shuffle(kinds)
    return [(k, rng.choice(models).names[0]) for k in kinds], burst_plan


def mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def report(args, dep, sampler: Sampler, outcomes: list[Outcome], warm: list[Outcome], wall_s: float, drained: dict,
           health: str, not_sent: int) -> tuple[str, dict, bool]:
    by_status = collections.Counter(o.status for o in outcomes)
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        by_kind[o.kind + (" (retry after 429)" if o.retry else "")][o.status] += 1
    five = [o for o in outcomes + warm if status_class(o.status) == "5xx"]
    transport = [o for o in outcomes + warm if o.status.startswith("transport")]
    unexpected = [o for o in outcomes if not o.expected]
    leaked = {k: v for k, v in drained.items() if v != 0}
    died = [p.name for p in sampler.procs.values() if p.gone or p.restarted_as]
    failed = bool(five or transport or leaked or died or health != "200")
    sent_first = sum(1 for o in outcomes if not o.retry)
    warm_counts = ", ".join(f"{s}: {n}" for s, n in sorted(collections.Counter(o.status for o in warm).items()))
    lines = [
        f"# Soak run {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"profile `{args.profile}`; {sent_first} requests (+{len(outcomes) - sent_first} retries after 429) in "
        f"{wall_s:.0f} s, concurrency {args.concurrency}, max_tokens {args.max_tokens}, seed {args.seed}"
        + (f"; {not_sent} not sent (deadline {args.deadline_s:.0f} s)" if not_sent else ""),
        (f"processes found by {sampler.pids_found_by}; sampled every {args.sample_s:g} s; warm-up before the "
         f"start figures: {len(warm)} requests ({warm_counts})"),
        "",
        (f"**5xx: {len(five)}**; transport errors: {len(transport)}; unexpected outcomes: {len(unexpected)}; "
         f"API /health at the end: {health}; queues drained: {'yes' if not leaked else f'NO {leaked}'}; "
         f"servers died or restarted: {', '.join(died) or 'none'}"),
        "",
        "## Status codes",
        "",
        "| status | count |", "|---|---|",
        *[f"| {s} | {n} |" for s, n in sorted(by_status.items())],
        "",
        "## By kind",
        "",
        "| kind | expected | outcomes |", "|---|---|---|",
        *[f"| {k} | {EXPECTED.get(k.split(' ')[0], '')} | {', '.join(f'{s}: {n}' for s, n in sorted(c.items()))} |"
          for k, c in sorted(by_kind.items())],
        "",
        "## Workers",
        "",
        "| worker | worst queue length | slots + max_queue |", "|---|---|---|",
        *[f"| {m.program} | {sampler.queue_max[m.program]} | {m.limit_concurrency} + {m.max_queue} |" for m in dep.models],
        "",
        "## RSS (MiB)",
        "",
        "start: after the warm-up; cold: before it", "",
        "| process | pid | cold | start | at 25 % | peak | end | end - start | end - at 25 % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sampler.procs.values():
        quarter = next((v for t, v in p.samples if t >= 0.25 * wall_s), p.end_rss)
        lines.append(f"| {p.name} | {p.pid} | {mib(p.cold_rss)} | {mib(p.start_rss)} | {mib(quarter)} | "
                     f"{mib(p.peak_rss)} | {mib(p.end_rss)} | {(p.end_rss - p.start_rss) / 2**20:+.0f} | "
                     f"{(p.end_rss - quarter) / 2**20:+.0f} |")
    if unexpected:
        lines += ["", "## Unexpected outcomes (first 20)", "", "| kind | variant | status | detail |", "|---|---|---|---|"]
        lines += [f"| {o.kind} | {o.variant} | {o.status} | {o.detail[:120].replace('|', '/')} |" for o in unexpected[:20]]
    lines += ["", f"result: {'FAIL' if failed else 'ok'}"]
    data = {
        "args": vars(args), "wall_s": wall_s, "five_xx": len(five), "transport_errors": len(transport),
        "unexpected": len(unexpected), "health": health, "drained": drained, "died": died, "failed": failed,
        "not_sent": not_sent, "by_status": dict(by_status), "by_kind": {k: dict(c) for k, c in by_kind.items()},
        "queue_max": sampler.queue_max, "queue_samples": sampler.queue_samples,
        "status_errors": dict(sampler.status_errors),
        "processes": {p.name: asdict(p) for p in sampler.procs.values()},
        "outcomes": [asdict(o) for o in outcomes], "warm_up": [asdict(o) for o in warm],
    }
    return "\n".join(lines), data, failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=os.environ.get("BUNDLE_PROFILE", "default"),
                   help="conf/<profile>.yaml or a path: the deployment that runs")
    p.add_argument("--requests", type=int, default=1000, help="requests in all, bursts included (retries extra)")
    p.add_argument("--concurrency", type=int, default=6, help="clients sending the mix at once (bursts extra)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--deadline-s", type=float, default=1800, help="send nothing new after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bursts", type=int, default=None, help="bursts above a worker's queue (default requests/250)")
    p.add_argument("--no-max-tokens", type=int, default=None,
                   help="requests without max_tokens (default requests/250; each may generate the model's default)")
    p.add_argument("--sample-s", type=float, default=2.0, help="seconds between queue and RSS samples")
    p.add_argument("--overlong-words", type=int, default=OVERLONG_WORDS)
    p.add_argument("--run-dir", type=Path, default=None, help="the bundle's var/run (default: $BUNDLE_VAR_DIR/run)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default var/reports/soak)")
    args = p.parse_args(argv)
    dep, api, key = profile_api(args.profile)
    run = args.run_dir or run_dir()
    out_dir = args.out or reports_dir() / "soak"
    bursts = args.bursts if args.bursts is not None else max(1, args.requests // 250)
    no_max = args.no_max_tokens if args.no_max_tokens is not None else max(1, args.requests // 250)
    client = Client(api, key, args.max_tokens)
    try:
        client.openai.models.list()
    except Exception as exc:  # noqa: BLE001
        print(f"error: the API at {api} does not answer: {_error_status(exc)}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    sizes = {m.program: m.limit_concurrency + m.max_queue + 4 for m in dep.models}
    items, burst_plan = plan(args.requests, dep.models, rng, bursts, no_max, sizes)
    seeds = [rng.random() for _ in items]
    sampler = Sampler(dep, run, args.sample_s)
    sampler.cold()
    warm = warm_up(client, [m.names[0] for m in dep.models])
    print(f"soak: {len(items)} mixed requests + {len(burst_plan)} bursts ({', '.join(str(sizes[m.program]) for _, m in burst_plan)}"
          f" requests) against {api}; workers {sampler.addresses}; pids {', '.join(f'{p.name}={p.pid}' for p in sampler.procs.values())} "
          f"(by {sampler.pids_found_by})", flush=True)
    sampler.start()
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    done = [0]
    not_sent = [0]
    bar = tqdm(total=len(items) + sum(sizes[m.program] for _, m in burst_plan), desc="soak", unit="req")

    def record(os_: list[Outcome]) -> None:
        with lock:
            outcomes.extend(os_)
            firsts = sum(1 for o in os_ if not o.retry)
            bar.update(firsts)
            fives = sum(1 for o in outcomes if status_class(o.status) == "5xx")
            bar.set_postfix(q=max(sampler.queue_max.values()), five_xx=fives)

    def one(i: int) -> None:
        if time.monotonic() - t0 > args.deadline_s:
            with lock:
                not_sent[0] += 1
            return
        kind, model = items[i]
        first = run_one(client, kind, model, random.Random(seeds[i]), args.overlong_words)
        got = [first]
        if first.status == "429":  # the queue was full (a burst under way): honour Retry-After once
            first.expected = bool(first.retry_after)
            time.sleep(min(float(first.retry_after or 2), 120.0))
            again = run_one(client, kind, model, random.Random(seeds[i]), args.overlong_words)
            again.retry = True
            got.append(again)
        record(got)
        with lock:
            done[0] += 1

    def burster() -> None:
        for n, (fraction, spec) in enumerate(burst_plan):
            while done[0] < fraction * len(items) and time.monotonic() - t0 < args.deadline_s:
                time.sleep(0.5)
            if time.monotonic() - t0 > args.deadline_s:
                with lock:
                    not_sent[0] += sum(sizes[m.program] for _, m in burst_plan[n:])
                return
            record(burst(client, spec, sizes[spec.program], random.Random(rng.random()), sampler.watch_burst))

    burst_thread = threading.Thread(target=burster, name="bursts", daemon=True)
    burst_thread.start()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, range(len(items))))
    burst_thread.join()
    bar.close()
    wall = time.monotonic() - t0
    drained = sampler.drain(60)
    time.sleep(max(args.sample_s, 3))  # an idle moment, then the end figures
    sampler.sample()
    sampler.stop()
    sampler.check_restarts()
    try:
        health = str(httpx.get(api.removesuffix("/v1") + "/health", timeout=10, trust_env=False).status_code)
    except httpx.HTTPError as exc:
        health = f"no answer ({type(exc).__name__})"
    client.close()
    text, data, failed = report(args, dep, sampler, outcomes, warm, wall, drained, health, not_sent[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"soak-{stamp}.md").write_text(text + "\n")
    (out_dir / f"soak-{stamp}.json").write_text(json.dumps(data, indent=1, default=str))
    print(text)
    print(f"\nwritten to {out_dir}/soak-{stamp}.md and .json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
