"""How the bundle's web page talks to a worker (fastchat_compat.apply_web routes FastChat 0.2.36's Gradio chat here).

FastChat's web UI renders the prompt itself, with a conversation template chosen from the model's
NAME, and sends it as text. Here it sends the conversation as `messages`, so the worker renders
the model's own chat format, and leaves sampling defaults it does not show (repetition penalty)
to the model. It also:
- registers every running answer by browser session, so the page's Stop button cancels it on the
  worker (`/worker_cancel`), which ends the generation within one decode step; FastChat then shows
  the partial answer as a finished one;
- ends each answer with a line of its tokens and speed, which is stripped again before the
  conversation is sent back to the model.
"""
from __future__ import annotations

import json
import re
import threading
import uuid

import requests

STATS = re.compile(r"\n\n<sub>⏱ [^<\n]*</sub>$")
WORKER_TIMEOUT_S = 600  # a long answer on a busy CPU; the stream itself keeps the connection busy



def conversation_messages(conv) -> list[dict]:
    """OpenAI-style messages of a FastChat Conversation being answered (its last turn is the
    assistant's, still empty). Turns alternate user/assistant after the template's examples.

    The template's own system message is not sent: FastChat picks the template by the model's
    name, so it is usually another model's; the worker applies the model's own default instead.
    """
    messages = []
    for i, (_, text) in enumerate(conv.messages[conv.offset:]):
        if isinstance(text, tuple):  # (text, images): images are not supported by these models
            text = text[0]
        if text is None or text == "▌":
            continue
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": STATS.sub("", text)})
    return messages


def stats_line(usage: dict, seconds: float) -> str:
    n = usage.get("completion_tokens", 0)
    speed = f", {n / seconds:.1f} tok/s" if seconds > 0 and n else ""
    return f"\n\n<sub>⏱ {n} tokens{speed}</sub>"


class WebChat:
    """The web UI's answers: streamed from the workers through `http` (auth.RequestsShim: the worker secret, a
    connect timeout), each registered by browser session so that Stop can cancel it."""

    def __init__(self, http):
        self.http = http
        self._active: dict[str, dict[str, str]] = {}  # browser session -> {request_id: worker address}
        self._lock = threading.Lock()

    def stream_from_worker(self, conv, model_name, worker_addr, prompt, temperature, repetition_penalty, top_p,
                           max_new_tokens, images, session: str | None = None):
        """Replacement for gradio_web_server.model_worker_stream_iter (same arguments; `prompt` and
        `repetition_penalty` from FastChat's template are not used)."""
        import time

        request_id = uuid.uuid4().hex[:12]
        params = {"model": model_name, "messages": conversation_messages(conv), "temperature": temperature,
                  "top_p": top_p, "max_new_tokens": max_new_tokens, "request_id": request_id, "echo": False}
        if session:
            with self._lock:
                self._active.setdefault(session, {})[request_id] = worker_addr

        def chunks():
            first = None
            try:
                with self.http.post(worker_addr + "/worker_generate_stream", json=params, stream=True,
                                    timeout=WORKER_TIMEOUT_S) as response:
                    if response.status_code != 200:
                        try:
                            message = response.json()["error"]["message"]
                        except (ValueError, KeyError, TypeError):
                            message = response.text
                        yield {"text": message, "error_code": response.status_code}
                        return
                    for raw in response.iter_lines(decode_unicode=False, delimiter=b"\0"):
                        if not raw:
                            continue
                        data = json.loads(raw.decode())
                        first = first or time.monotonic()
                        if data.get("finish_reason") and data.get("error_code", 0) == 0:
                            data = {**data, "text": data["text"].strip() + stats_line(data.get("usage", {}),
                                                                                      time.monotonic() - first)}
                        yield data
            finally:
                if session:
                    with self._lock:
                        self._active.get(session, {}).pop(request_id, None)

        return chunks()

    def stop_answers(self, session: str) -> int:
        """Cancel every answer the session is waiting for; returns how many were asked to stop."""
        with self._lock:
            running = dict(self._active.get(session, {}))
        for request_id, worker_addr in running.items():
            try:
                self.http.post(worker_addr + "/worker_cancel", json={"request_id": request_id}, timeout=5)
            except requests.RequestException:
                pass  # the worker is gone: its answer ends anyway
        return len(running)
