"""How the bundle's web page talks to the controller and the workers (no Gradio here).

The page keeps a conversation as Gradio "messages" (role, content, metadata). What goes to the
worker is derived from it: folded reasoning is left out and the tokens-and-speed line at the end
of each answer is stripped, so the worker renders the model's own chat format from plain turns.
Every running answer is registered by browser session, so the page's Stop button cancels it on
the worker (`/worker_cancel`), which ends the generation within one decode step.
"""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field

import requests

STATS = re.compile(r"\n\n<sub>⏱ [^<\n]*</sub>$")
WORKER_TIMEOUT_S = 600  # a long answer on a busy CPU; the stream itself keeps the connection busy
CONTROL_TIMEOUT_S = 10
# Markers a model writes around its reasoning when its family data names none.
DEFAULT_REASONING_MARKERS = ("<think>", "</think>")
REASONING_TITLE = "💭 Reasoning"
# What the page's parameters panel shows and may send; the worker's own value for each comes from
# POST /model_details and is sent back only when the person changed it.
PANEL_PARAMS = ("temperature", "top_p", "max_new_tokens")
# What the panel shows until the picked model's defaults arrive (FastChat's page values).
PANEL_BEFORE_DEFAULTS = {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 1024}


# -- the models ---------------------------------------------------------------------------------

def int8_first(models: list[str], deployment_models) -> list[str]:
    """INT8 models first, then the others, each in the deployment's order; models the snapshot does
    not name (another bundle's workers) last. `deployment_models`: the snapshot's `models`."""
    position, int8 = {}, set()
    for spec in deployment_models:
        for name in spec.names:
            position.setdefault(name, len(position))
            if spec.backend == "itrex-int8":
                int8.add(name)
    return sorted(models, key=lambda m: (m not in int8, position.get(m, len(position)), m))


@dataclass
class ModelDefaults:
    """A worker's own answer settings (POST /model_details), shown in the parameters panel."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    context_length: int = 2048
    reasoning_markers: tuple[str, str] = DEFAULT_REASONING_MARKERS

    def panel(self) -> dict:
        return {k: getattr(self, k) for k in PANEL_PARAMS}


def changed_params(values: dict, defaults: dict | None) -> dict:
    """The panel's values that differ from the model's own defaults: only these are sent, so the
    worker's defaults (and any the page does not show) apply to everything else."""
    out = {}
    for key in PANEL_PARAMS:
        value = values.get(key)
        if value is None:
            continue
        default = (defaults or {}).get(key)
        if default is None or abs(float(value) - float(default)) > 1e-6:
            out[key] = int(value) if key == "max_new_tokens" else float(value)
    return out


# -- the conversation -----------------------------------------------------------------------------

def is_reasoning(message: dict) -> bool:
    return bool((message.get("metadata") or {}).get("title"))


def worker_messages(chat: list[dict]) -> list[dict]:
    """The turns the model is sent: user and assistant text, without reasoning or the stats line."""
    out = []
    for m in chat:
        if m.get("role") not in ("user", "assistant") or is_reasoning(m) or not isinstance(m.get("content"), str):
            continue
        text = STATS.sub("", m["content"]) if m["role"] == "assistant" else m["content"]
        if out and out[-1]["role"] == m["role"]:  # a stopped answer left two user turns in a row, say
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + text}
        else:
            out.append({"role": m["role"], "content": text})
    return out


def split_reasoning(text: str, markers: tuple[str, str] = DEFAULT_REASONING_MARKERS) -> tuple[str, str]:
    """(reasoning, answer) of a model's text, whole or still streaming.

    The reasoning is what stands between the family's opening and closing marker. Templates that
    write the opening marker into the prompt leave only the closing one in the answer: then
    everything before it is reasoning. An opening marker not closed yet means the model is still
    reasoning: all after it is reasoning so far.
    """
    start, end = markers
    head = text.lstrip()
    if head.startswith(start):
        body = head[len(start):]
        reasoning, sep, answer = body.partition(end)
        return reasoning.strip(), answer.strip() if sep else ""
    if end in text and start not in text:
        reasoning, _, answer = text.partition(end)
        return reasoning.strip(), answer.strip()
    return "", text


def assistant_messages(reasoning: str, answer: str) -> list[dict]:
    """How one answer shows in the chat: its reasoning folded under a title, then the answer."""
    out = []
    if reasoning:
        out.append({"role": "assistant", "content": reasoning, "metadata": {"title": REASONING_TITLE}})
    if answer or not reasoning:
        out.append({"role": "assistant", "content": answer})
    return out


def title_of(chat: list[dict], limit: int = 48) -> str:
    first = next((m["content"] for m in chat if m.get("role") == "user" and isinstance(m.get("content"), str)), "")
    first = " ".join(first.split())
    return (first[:limit - 1] + "…") if len(first) > limit else (first or "New chat")


def stats_line(usage: dict, seconds: float) -> str:
    n = usage.get("completion_tokens", 0)
    speed = f", {n / seconds:.1f} tok/s" if seconds > 0 and n else ""
    return f"\n\n<sub>⏱ {n} tokens{speed}</sub>"


# -- streaming and stopping ------------------------------------------------------------------------

@dataclass
class Answer:
    """One answer as it streams: the text so far, reasoning split off, and how it ended."""
    reasoning: str = ""
    text: str = ""
    error: str = ""
    stats: str = ""
    done: bool = False
    extra: dict = field(default_factory=dict)

    def take(self, chunk: dict, markers: tuple[str, str] = DEFAULT_REASONING_MARKERS) -> None:
        """The answer so far from a worker's stream chunk (its `text` is the whole answer so far). A
        worker that splits reasoning itself sends `reasoning_content` (None: no reasoning) and
        `content`; otherwise the page splits `text` by the family's markers."""
        if "reasoning_content" in chunk:
            self.reasoning = (chunk["reasoning_content"] or "").strip()
            self.text = chunk.get("content", chunk.get("text", ""))
        else:
            self.reasoning, self.text = split_reasoning(chunk.get("text", ""), markers)

    def messages(self) -> list[dict]:
        if self.error:
            return [{"role": "assistant", "content": f"**Error:** {self.error}"}]
        answer = self.text.strip() if self.done else self.text + "▌"
        return assistant_messages(self.reasoning, answer + (self.stats if self.done else ""))


class Workers:
    """The controller and the workers as the page reaches them: through `http` (auth.RequestsShim: the worker
    secret and a connect timeout on every call), each streaming answer registered by browser session so that Stop
    cancels it on its worker."""

    def __init__(self, controller: str, http):
        self.controller, self.http = controller, http
        self._active: dict[str, dict[str, str]] = {}  # browser session -> {request_id: worker address}
        self._lock = threading.Lock()

    def model_list(self) -> list[str]:
        """The models the controller serves now (asking it to drop workers that stopped first)."""
        self.http.post(self.controller + "/refresh_all_workers", timeout=CONTROL_TIMEOUT_S)
        r = self.http.post(self.controller + "/list_models", timeout=CONTROL_TIMEOUT_S)
        r.raise_for_status()
        return sorted(set(r.json()["models"]))

    def worker_address(self, model: str) -> str:
        r = self.http.post(self.controller + "/get_worker_address", json={"model": model},
                           timeout=CONTROL_TIMEOUT_S)
        r.raise_for_status()
        return r.json().get("address") or ""

    def model_defaults(self, model: str) -> ModelDefaults:
        address = self.worker_address(model)
        if not address:
            raise RuntimeError(f"no worker serves {model} now")
        r = self.http.post(address + "/model_details", json={"model": model}, timeout=CONTROL_TIMEOUT_S)
        r.raise_for_status()
        data = r.json()
        sampling = data.get("sampling") or {}
        markers = data.get("reasoning_markers") or DEFAULT_REASONING_MARKERS
        return ModelDefaults(temperature=float(sampling.get("temperature", 1.0)),
                             top_p=float(sampling.get("top_p", 1.0)), max_new_tokens=int(data.get("max_tokens_default", 512)),
                             context_length=int(data.get("context_length", 2048)), reasoning_markers=tuple(markers))

    def stream_answer(self, model: str, chat: list[dict], params: dict, session: str | None = None,
                      markers: tuple[str, str] = DEFAULT_REASONING_MARKERS):
        """Yields the growing Answer to the conversation `chat` (its last turn is the user's)."""
        answer = Answer()
        try:
            address = self.worker_address(model)
        except requests.RequestException as exc:
            answer.error, answer.done = f"the controller did not answer ({type(exc).__name__})", True
            yield answer
            return
        if not address:
            answer.error, answer.done = f"no worker serves {model} now; reload the page", True
            yield answer
            return
        request_id = uuid.uuid4().hex[:12]
        payload = {"model": model, "messages": worker_messages(chat), **params, "request_id": request_id, "echo": False}
        if session:
            with self._lock:
                self._active.setdefault(session, {})[request_id] = address
        first = None
        try:
            with self.http.post(address + "/worker_generate_stream", json=payload, stream=True,
                                timeout=WORKER_TIMEOUT_S) as response:
                if response.status_code != 200:
                    try:
                        answer.error = response.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        answer.error = response.text or f"HTTP {response.status_code}"
                    answer.done = True
                    yield answer
                    return
                for raw in response.iter_lines(decode_unicode=False, delimiter=b"\0"):
                    if not raw:
                        continue
                    data = json.loads(raw.decode())
                    first = first or time.monotonic()
                    if data.get("error_code", 0):
                        answer.error, answer.done = str(data.get("text", "")), True
                        yield answer
                        return
                    answer.take(data, markers)
                    if data.get("finish_reason"):
                        answer.done = True
                        answer.stats = stats_line(data.get("usage") or {}, time.monotonic() - first)
                    yield answer
        except requests.RequestException as exc:
            answer.error = f"the worker of {model} did not answer ({type(exc).__name__})"
        finally:
            if session:
                with self._lock:
                    self._active.get(session, {}).pop(request_id, None)
        if not answer.done:  # the stream ended without a finish reason (worker gone)
            answer.done = True
            yield answer

    def answering(self, session: str | None) -> bool:
        """Whether an answer for this browser session is streaming now."""
        with self._lock:
            return bool(session and self._active.get(session))

    def stop_answers(self, session: str) -> int:
        """Cancel every answer the session is waiting for; returns how many were asked to stop."""
        with self._lock:
            running = dict(self._active.get(session, {}))
        for request_id, address in running.items():
            try:
                self.http.post(address + "/worker_cancel", json={"request_id": request_id}, timeout=5)
            except requests.RequestException:
                pass  # the worker is gone: its answer ends anyway
        return len(running)
