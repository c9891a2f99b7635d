"""What the tools share to talk to a running bundle's OpenAI-style API: address and key, one streamed
answer with its timings, and token counts by the model's own tokenizer."""
from __future__ import annotations

import sys
import time

import requests

from workers.config import hosts, secrets
from workers.config.schema import Deployment


def base_url(dep: Deployment) -> str:
    return f"{hosts.url(dep, 'api')}/v1"  # with hosts: the API's host's address


def api_key(dep: Deployment) -> str:
    """The first of the deployment's API keys, "none" when it requires none (raises secrets.SecretError)."""
    keys = secrets.api_keys(dep.api)
    return keys[0] if keys else "none"


def profile_api(profile: str) -> tuple[Deployment, str, str]:
    """The profile's deployment, its API's address and key; a profile that does not load, or a key that cannot be
    read, ends the tool with exit code 2 and the problem on stderr."""
    from workers.config import deployment

    try:
        dep = deployment.load(profile)
        return dep, base_url(dep), api_key(dep)
    except (deployment.DeploymentError, secrets.SecretError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class NotServed(Exception):
    """The API does not answer (exit_code 1) or does not serve a model asked for (exit_code 2)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def served_models(api: str, key: str, wanted: list[str] | None = None) -> list[str]:
    """The models the running bundle serves (`wanted`, when given, must all be among them), checked before a tool
    sends its first question, so a bundle that is down or still starting gets one clear line, not a run of errors."""
    try:
        listed = requests.get(api + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        listed.raise_for_status()
    except requests.RequestException as exc:
        raise NotServed(f"the API at {api} does not answer ({exc}); start the bundle with scripts/start_all.sh", 1)
    try:
        served = [m["id"] for m in listed.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise NotServed(f"{api}/models answers, but not with an OpenAI model list: is another program on that port?", 1)
    if not served:
        raise NotServed(f"the API at {api} serves no model yet (scripts/status.sh shows the workers)", 1)
    missing = [m for m in wanted or [] if m not in served]
    if missing:
        raise NotServed(f"not served: {', '.join(missing)} (served: {', '.join(served)}); scripts/status.sh shows "
                        "the workers", 2)
    return served


def openai_client(api: str, key: str, max_retries: int, timeout: float):
    from openai import OpenAI

    return OpenAI(base_url=api, api_key=key, max_retries=max_retries, timeout=timeout)


def ask(client, model: str, text: str | list[dict], max_tokens: int, temperature: float, **extra) -> dict:
    """One streamed answer (to a question, or to a whole list of chat messages) with its timings, and
    its token count when the API sends the usage. `extra`: more request fields (e.g. response_format)."""
    messages = text if isinstance(text, list) else [{"role": "user", "content": text}]
    t0 = time.perf_counter()
    first = None
    parts: list[str] = []
    finish = tokens = None
    try:
        stream = client.chat.completions.create(model=model, messages=messages,
                                                max_tokens=max_tokens, temperature=temperature, stream=True,
                                                stream_options={"include_usage": True}, **extra)
        for chunk in stream:
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                first = first or time.perf_counter()
                parts.append(delta)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if getattr(chunk, "usage", None):  # the last chunk, where the API supports include_usage
                tokens = chunk.usage.completion_tokens
        error = None
    except Exception as exc:  # recorded per answer; the run goes on
        error = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
    total = time.perf_counter() - t0
    return {"answer": "".join(parts), "ttft_s": (first - t0) if first else None, "total_s": total,
            "finish_reason": finish, "error": error, "tokens": tokens}


def answer_tokens(api: str, key: str, model: str, answer: dict) -> int | None:
    """Tokens of an answer from ask(): the API's usage, else counted by the model's tokenizer."""
    if answer["tokens"] is not None:
        return answer["tokens"]
    return count_tokens(api, key, model, answer["answer"])


def count_tokens(api: str, key: str, model: str, text: str) -> int | None:
    """Tokens of `text`, counted by the model's own tokenizer (FastChat's /api/v1/token_check, where served)."""
    if not text:
        return 0
    try:
        r = requests.post(api.removesuffix("/v1") + "/api/v1/token_check", timeout=30,
                          headers={"Authorization": f"Bearer {key}"},
                          json={"prompts": [{"model": model, "prompt": text, "max_tokens": 0}]})
        return r.json()["prompts"][0]["tokenCount"]
    except (requests.RequestException, KeyError, ValueError):
        return None
