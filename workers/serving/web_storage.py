"""Conversations kept in the browser (localStorage), so a reload or a new visit finds them again.

gradio 4.44 has no browser-side state component, so the page carries two small scripts: LOAD_JS
reads every saved conversation when the page loads and hands them to the server for this visit;
STORE_JS writes (or removes) one conversation after each answer (or delete). One localStorage key
per conversation, so two open tabs do not overwrite each other's chats. Nothing leaves the browser
except to this page's own server.
"""
from __future__ import annotations

import time
import uuid

PREFIX = "bundle-chat:"

# demo.load's inputs are (url params, saved conversations); this fills both.
LOAD_JS = """(params, saved) => {
  const chats = [];
  for (let i = 0; i < localStorage.length; i++) {
    const key = localStorage.key(i);
    if (!key || !key.startsWith(PREFIX)) continue;
    try { chats.push(JSON.parse(localStorage.getItem(key))); } catch (e) { localStorage.removeItem(key); }
  }
  return [Object.fromEntries(new URLSearchParams(window.location.search)), chats];
}""".replace("PREFIX", repr(PREFIX))

STORE_JS = """(record) => {
  if (!record || !record.id) return;
  const key = PREFIX + record.id;
  if (record.deleted) localStorage.removeItem(key);
  else localStorage.setItem(key, JSON.stringify(record));
}""".replace("PREFIX", repr(PREFIX))


def record(conv_id: str | None, model: str | None, messages: list[dict], title: str, now: float | None = None) -> dict:
    """The stored form of one conversation (a new id when it has none yet)."""
    return {"id": conv_id or uuid.uuid4().hex[:16], "title": title, "model": model or "", "messages": messages,
            "updated": now if now is not None else time.time()}


def valid(saved) -> dict[str, dict]:
    """The conversations the browser sent, by id; anything malformed is left out."""
    out = {}
    for c in saved if isinstance(saved, list) else []:
        if (isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("messages"), list)
                and all(isinstance(m, dict) and m.get("role") in ("user", "assistant") for m in c["messages"])):
            out[c["id"]] = c
    return out


def listing(chats: dict[str, dict]) -> list[tuple[str, str]]:
    """(title, id) choices for the chat list, newest first."""
    ordered = sorted(chats.values(), key=lambda c: c.get("updated") or 0, reverse=True)
    return [(str(c.get("title") or "Chat"), c["id"]) for c in ordered]
