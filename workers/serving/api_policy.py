"""The API's input rules, as pure functions: a JSON body in, a validated plan (or an errors.ApiError) out.

Nothing here does I/O, so every rule is unit-tested without a server (tests/unit/test_api_policy.py).
FastChat's protocol models (fastchat.protocol.openai_api_protocol) still validate the fields they know; the
rules here cover what they let through:
- `messages`: a non-empty list; roles system/user/assistant/tool (and the older function); `content` a string
  or a list of content parts (text parts joined with newlines; image, audio and file parts -> 400 "not
  supported"); a string -> 400. Assistant `tool_calls`/`function_call` and a tool's `tool_call_id` are kept.
- `tools`/`functions`, `tool_choice`/`function_call`, `response_format`: checked by tool_calls.plan.
- OpenAI parameters this server does not implement -> 400 naming the parameter (UNSUPPORTED below), so
  nothing is silently ignored; `n` at most MAX_N; penalties in [-2, 2]; `max_completion_tokens` is max_tokens.
- `stream_options.include_usage`: a last chunk with the usage and no choices.
- logprobs (chat: `logprobs` true and `top_logprobs` 0..20; completions: `logprobs` 0..5, with `echo` also the
  prompt's), `logit_bias` ({token id: -100..100}; ids the model lacks are the worker's 400) and `seed` (an
  integer) go to the worker; the OpenAI shapes of the logprobs are built here (chat_logprobs, completion_logprobs).
- `chat_template_kwargs` (chat): an object passed to the model's chat template as variables (Qwen3's
  `enable_thinking`), as vLLM and SGLang take it; anything else -> 400. The worker refuses keys the
  template machinery sets itself (messages, add_generation_prompt, bos_token, ...).
- prompts and embedding inputs: a string, a list of strings, a list of token ids or a list of lists of token
  ids (decoded by the worker with the model's own tokenizer); empty, `[{}]`, `[null]` -> 400.
- sampling fields the client leaves out are sent as null: the worker applies the model's defaults.
- request bodies above MAX_BODY_BYTES -> 413, before the body is parsed (BodySizeLimit).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import pydantic
from fastchat.protocol.openai_api_protocol import ChatCompletionRequest, CompletionRequest, EmbeddingsRequest

from workers.engine.sampling_limits import LIMITS, LOGIT_BIAS, TOP_LOGPROBS
from workers.serving import errors, tool_calls
from workers.serving.errors import ApiError

MAX_BODY_BYTES = 1 << 20  # 1 MiB: about 250k tokens of text, far more than any served context
MAX_N = 8
MAX_CHOICES = 16  # prompts x n in one /v1/completions request
MAX_EMBEDDING_INPUTS = 256
MAX_STOP = 16
MAX_TOKEN_ID = 2**31 - 1
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions (chat: the model's default)
ROLES = ("system", "user", "assistant", "tool", "function")  # function: the older form of a tool result
NON_TEXT_PARTS = ("image_url", "input_image", "image", "input_audio", "audio", "file", "input_file", "video_url")

CHAT, COMPLETIONS, EMBEDDINGS = "chat", "completions", "embeddings"

# parameter -> (values that mean "not used", why it is refused otherwise)
UNSUPPORTED: dict[str, dict[str, tuple[tuple, str]]] = {
    CHAT: {
        "audio": ((None,), "the served models read and write text only"),
        "modalities": ((None, ["text"]), "the served models read and write text only"),
        "prediction": ((None,), "predicted outputs are not implemented"),
    },
    COMPLETIONS: {
        "suffix": ((None, ""), "insertion (suffix) is not implemented"),
        "best_of": ((None, 1), "best_of is not implemented"),
        "use_beam_search": ((None, False), "beam search is not implemented"),
    },
    EMBEDDINGS: {
        "dimensions": ((None,), "the embedding size is the model's hidden size"),
    },
}


# --- plans: what a validated request asks for --------------------------------------------------------------
@dataclass
class Sampling:
    """Null means "the model's default" (the worker applies it)."""
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    max_tokens: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = None


@dataclass
class ChatPlan:
    model: str
    messages: list[dict]  # [{"role", "content": str}]
    sampling: Sampling
    n: int
    stream: bool
    include_usage: bool
    protocol: ChatCompletionRequest
    template_kwargs: dict = field(default_factory=dict)  # chat_template_kwargs, for the worker
    logprobs: Optional[int] = None  # None: no logprobs; else top logprobs per token
    tools: tool_calls.ToolPlan = field(default_factory=tool_calls.ToolPlan)


@dataclass
class CompletionPlan:
    model: str
    prompts: list  # each a str or a list of token ids
    sampling: Sampling
    n: int
    stream: bool
    include_usage: bool
    echo: bool  # done by the API: the prompt text is put before the answer
    protocol: CompletionRequest
    logprobs: Optional[int] = None  # None: no logprobs; else top logprobs per token (and the prompt's with echo)


@dataclass
class EmbeddingPlan:
    model: str
    inputs: list  # each a str or a list of token ids
    encoding_format: Optional[str]
    protocol: EmbeddingsRequest


class StreamOptions(pydantic.BaseModel):
    include_usage: Optional[bool] = None


class Extras(pydantic.BaseModel):
    """Fields FastChat's protocol models do not have."""
    max_completion_tokens: Optional[int] = None
    repetition_penalty: Optional[float] = None
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict[str, Any]] = None
    seed: Optional[int] = None


class ChatLogprobs(pydantic.BaseModel):
    """Chat's logprob fields (FastChat's ChatCompletionRequest has none)."""
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None


class ChatExtras(Extras):
    """Chat fields FastChat's protocol model does not have."""
    chat_template_kwargs: Optional[dict[str, Any]] = None


# --- helpers ------------------------------------------------------------------------------------------------
def _invalid(message: str, param: str | None) -> ApiError:
    return ApiError(errors.INVALID_VALUE, message, param)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object; NaN/Infinity, non-objects and undecodable bytes are 400."""
    if not raw or not raw.strip():
        raise ApiError(errors.INVALID_JSON, "the request body is empty: send a JSON object")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(errors.INVALID_JSON, "the request body is nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ApiError(errors.INVALID_JSON, f"the request body is not UTF-8 JSON: {exc.reason}") from None
    except ValueError as exc:
        raise ApiError(errors.INVALID_JSON, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(errors.INVALID_JSON, f"the request body must be a JSON object (got {type(body).__name__})")
    _check_unicode(body)
    return body


def _check_unicode(body: dict) -> None:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"), which is no character: tokenizers fail on it."""
    stack = [body]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            for s in (key, value):
                if isinstance(s, str):
                    try:
                        s.encode("utf-8")
                    except UnicodeEncodeError:
                        raise ApiError(errors.INVALID_JSON, "the request body has a string with a lone UTF-16 "
                                       "surrogate (an escape like \\ud800 without its pair): not valid Unicode") from None
            if isinstance(value, (dict, list)):
                stack.append(value)


def validate(model_cls, data: dict):
    """FastChat's (or our) pydantic model, its first error naming the field as `param`."""
    try:
        return model_cls.model_validate(data)
    except pydantic.ValidationError as exc:
        raise errors.from_validation(exc.errors(include_url=False)) from None
    except RecursionError:
        raise ApiError(errors.INVALID_REQUEST, "the request is nested too deeply") from None


def check_range(name: str, value, lo=None, hi=None) -> None:
    """OpenAI's wording: "5 is greater than the maximum of 2 - 'temperature'". NaN never passes."""
    if value is None:
        return
    if lo is not None and not value >= lo:
        raise _invalid(f"{_shown(value)} is less than the minimum of {_shown(lo)} - '{name}'", name)
    if hi is not None and not value <= hi:
        raise _invalid(f"{_shown(value)} is greater than the maximum of {_shown(hi)} - '{name}'", name)


def _shown(number):
    return int(number) if isinstance(number, float) and number.is_integer() else number


def _require_model(body: dict) -> str:
    model = body.get("model")
    if model is None:
        raise ApiError(errors.MISSING_PARAMETER, "model: this field is required (one of the served model names)", "model")
    if not isinstance(model, str):
        raise _invalid(f"model must be a string (got {errors.short(model)})", "model")
    return model


def unsupported(body: dict, endpoint: str) -> None:
    """400 naming the first OpenAI parameter this server would otherwise silently ignore."""
    for name, (unused, why) in UNSUPPORTED[endpoint].items():
        value = body.get(name)
        if value is None or any(type(value) is type(u) and value == u for u in unused):
            continue  # absent, or a value that asks for nothing (tool_choice "auto" with no tools, ...)
        raise ApiError(errors.UNSUPPORTED_PARAMETER,
                       f"{name} is not supported by this server: {why} (got {errors.short(value)})", name)


# --- messages -------------------------------------------------------------------------------------------------
def content_text(content: Any, where: str) -> str:
    """A message's content as one string: a string, or the text parts of a content-part list joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if not content:
            raise _invalid(f"{where} must not be an empty list", where)
        texts = []
        for j, part in enumerate(content):
            at = f"{where}[{j}]"
            if not isinstance(part, dict):
                raise _invalid(f'{at} must be a content part like {{"type": "text", "text": "..."}} '
                               f"(got {errors.short(part)})", at)
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise _invalid(f"{at}.text must be a string (got {errors.short(text)})", f"{at}.text")
                texts.append(text)
            elif isinstance(kind, str) and kind in NON_TEXT_PARTS:
                raise ApiError(errors.UNSUPPORTED_CONTENT,
                               f"{at}: {kind} content is not supported: the served models read text only", at)
            else:
                raise _invalid(f"{at}.type must be 'text' (got {errors.short(kind)})", f"{at}.type")
        return "\n".join(texts)
    raise _invalid(f"{where} must be a string or a list of content parts (got {errors.short(content)})", where)


def chat_messages(messages: Any) -> list[dict]:
    """The validated messages, content flattened to strings: [{"role", "content"}]."""
    if isinstance(messages, str):
        raise _invalid('messages must be a list of messages like [{"role": "user", "content": "..."}], '
                       "not a string", "messages")
    if not isinstance(messages, list):
        raise _invalid(f"messages must be a list of messages (got {errors.short(messages)})", "messages")
    if not messages:
        raise _invalid("messages must contain at least one message", "messages")
    out = []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _invalid(f"{at} must be an object with 'role' and 'content' (got {errors.short(m)})", at)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _invalid(f"{at}.role must be one of {', '.join(ROLES)} (got {errors.short(role)})", f"{at}.role")
        if m.get("audio") not in (None, [], {}):
            raise ApiError(errors.UNSUPPORTED_PARAMETER, f"{at}.audio is not supported by this server: the served "
                           "models read and write text only", f"{at}.audio")
        calls = tool_calls.assistant_calls(m, at) if role == "assistant" else []
        if "content" not in m and not calls:
            raise _invalid(f"{at} has no 'content'", f"{at}.content")
        content = "" if calls and m.get("content") is None else content_text(m["content"], f"{at}.content")
        item = {"role": "tool" if role == "function" else role, "content": content}
        if calls:
            item["tool_calls"] = calls
        if role in ("tool", "function"):
            item["tool_call_id"] = m.get("tool_call_id") if isinstance(m.get("tool_call_id"), str) else None
            item["name"] = m.get("name") if isinstance(m.get("name"), str) else None
        out.append(item)
    return out


# --- prompts and embedding inputs ----------------------------------------------------------------------------
def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def token_ids(ids: list, where: str) -> list[int]:
    if not ids:
        raise _invalid(f"{where} must not be empty", where)
    for j, t in enumerate(ids):
        if not _is_token(t):
            raise _invalid(f"{where}[{j}] must be a token id (an integer), got {errors.short(t)}", f"{where}[{j}]")
        if not 0 <= t <= MAX_TOKEN_ID:
            raise _invalid(f"{where}[{j}]: token id {t} is out of range", f"{where}[{j}]")
    return list(ids)


def text_inputs(value: Any, param: str) -> list:
    """A string, list of strings, list of token ids or list of lists of token ids -> a list of items."""
    shapes = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(value, str):
        if not value:
            raise _invalid(f"{param} must not be empty", param)
        return [value]
    if not isinstance(value, list):
        raise _invalid(f"{param} must be {shapes} (got {errors.short(value)})", param)
    if not value:
        raise _invalid(f"{param} must not be empty", param)
    if _is_token(value[0]):
        return [token_ids(value, param)]
    out = []
    for i, item in enumerate(value):
        at = f"{param}[{i}]"
        if isinstance(item, str):
            if not item:
                raise _invalid(f"{at} must not be empty", at)
            out.append(item)
        elif isinstance(item, list):
            out.append(token_ids(item, at))
        else:
            raise _invalid(f"{at} must be a string or a list of token ids (got {errors.short(item)}); "
                           f"{param} must be {shapes}", at)
    return out


# --- sampling -------------------------------------------------------------------------------------------------
def _given(body: dict, protocol, name: str):
    """The validated value of a field the client set to something other than null, else None."""
    return getattr(protocol, name) if body.get(name) is not None else None


def stop_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP:
        raise _invalid(f"stop has {len(stops)} sequences; at most {MAX_STOP} are allowed", "stop")
    for i, s in enumerate(stops):
        if not s:
            raise _invalid(f"stop[{i}] must not be an empty string", f"stop[{i}]" if not isinstance(stop, str) else "stop")
    return stops


def logit_bias(value: Optional[dict]) -> Optional[dict[str, float]]:
    """OpenAI's {token id as a string: bias -100..100}; whether the model has each id is the worker's check."""
    if not value:
        return None
    out = {}
    for key, bias in value.items():
        at = f"logit_bias[{key!r}]"
        if not key.strip().lstrip("-").isdigit():
            raise _invalid(f"logit_bias keys must be token ids (integers as strings), got {key!r}", "logit_bias")
        if not 0 <= int(key) <= MAX_TOKEN_ID:
            raise _invalid(f"logit_bias: token id {int(key)} is out of range", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise _invalid(f"{at} must be a number from {LOGIT_BIAS[0]:g} to {LOGIT_BIAS[1]:g} "
                           f"(got {errors.short(bias)})", "logit_bias")
        check_range("logit_bias", bias, int(LOGIT_BIAS[0]), int(LOGIT_BIAS[1]))
        out[str(int(key))] = float(bias)
    return out


def sampling(body: dict, protocol, extras: Extras) -> Sampling:
    s = Sampling(
        temperature=_given(body, protocol, "temperature"),
        top_p=_given(body, protocol, "top_p"),
        top_k=_given(body, protocol, "top_k"),
        repetition_penalty=extras.repetition_penalty,
        presence_penalty=_given(body, protocol, "presence_penalty"),
        frequency_penalty=_given(body, protocol, "frequency_penalty"),
        max_tokens=_given(body, protocol, "max_tokens"),
        stop=stop_list(protocol.stop),
        logit_bias=logit_bias(extras.logit_bias),
        seed=extras.seed,
    )
    for name, (low, high) in LIMITS.items():  # the worker's own table
        check_range(name, getattr(s, name), low, high)
    check_range("max_tokens", s.max_tokens, 1)
    if s.seed is not None and not -2**63 <= s.seed < 2**64:
        raise _invalid(f"seed {s.seed} is out of range (a 64-bit integer)", "seed")
    return s


def chat_logprobs_asked(body: dict) -> Optional[int]:
    """Chat: None without `logprobs: true`, else its `top_logprobs` (0..20, default 0)."""
    asked = validate(ChatLogprobs, body)
    top = asked.top_logprobs
    check_range("top_logprobs", top, 0, TOP_LOGPROBS[CHAT])
    if not asked.logprobs:
        if top:
            raise _invalid("top_logprobs needs logprobs: true", "top_logprobs")
        return None
    return top or 0


def _n(protocol) -> int:
    n = protocol.n if protocol.n is not None else 1
    check_range("n", n, 1, MAX_N)
    return n


def _include_usage(extras: Extras, stream: bool) -> bool:
    if extras.stream_options is None:
        return False
    if not stream:
        raise _invalid("stream_options is only allowed when stream is true", "stream_options")
    return bool(extras.stream_options.include_usage)


# --- the three endpoints ------------------------------------------------------------------------------------
def chat_request(body: dict) -> ChatPlan:
    model = _require_model(body)
    unsupported(body, CHAT)
    if "messages" not in body:
        raise ApiError(errors.MISSING_PARAMETER, "messages: this field is required", "messages")
    messages = chat_messages(body["messages"])
    tools = tool_calls.plan(body)
    protocol = validate(ChatCompletionRequest, {**body, "messages": [{"role": m["role"], "content": m["content"]}
                                                                    for m in messages]})
    extras = validate(ChatExtras, body)
    s = sampling(body, protocol, extras)
    if extras.max_completion_tokens is not None:
        check_range("max_completion_tokens", extras.max_completion_tokens, 1)
        if s.max_tokens is not None and s.max_tokens != extras.max_completion_tokens:
            raise _invalid(f"max_tokens={s.max_tokens} and max_completion_tokens={extras.max_completion_tokens} "
                           "disagree: give one of them", "max_completion_tokens")
        s.max_tokens = extras.max_completion_tokens
    stream = bool(protocol.stream)
    return ChatPlan(model, messages, s, _n(protocol), stream, _include_usage(extras, stream), protocol,
                    template_kwargs=dict(extras.chat_template_kwargs or {}), logprobs=chat_logprobs_asked(body), tools=tools)


def completion_request(body: dict) -> CompletionPlan:
    model = _require_model(body)
    unsupported(body, COMPLETIONS)
    if "prompt" not in body:
        raise ApiError(errors.MISSING_PARAMETER, "prompt: this field is required", "prompt")
    prompts = text_inputs(body["prompt"], "prompt")
    protocol = validate(CompletionRequest, body)
    extras = validate(Extras, body)
    s = sampling(body, protocol, extras)  # no max_tokens: OpenAI's 16 (max_new_tokens(default=...))
    n = _n(protocol)
    if len(prompts) * n > MAX_CHOICES:
        raise _invalid(f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} completions; "
                       f"at most {MAX_CHOICES} per request", "prompt")
    echo = bool(protocol.echo)
    if echo and any(isinstance(p, list) for p in prompts):
        raise ApiError(errors.UNSUPPORTED_PARAMETER, "echo is not supported with token-id prompts: send the prompt "
                       "as text to have it echoed", "echo")
    check_range("logprobs", protocol.logprobs, 0, TOP_LOGPROBS[COMPLETIONS])
    stream = bool(protocol.stream)
    return CompletionPlan(model, prompts, s, n, stream, _include_usage(extras, stream), echo, protocol,
                          protocol.logprobs)


def embeddings_request(body: dict, model_from_path: str | None = None) -> EmbeddingPlan:
    if body.get("model") is None and model_from_path is not None:
        body = {**body, "model": model_from_path}
    model = _require_model(body)
    unsupported(body, EMBEDDINGS)
    if "input" not in body:
        raise ApiError(errors.MISSING_PARAMETER, "input: this field is required", "input")
    inputs = text_inputs(body["input"], "input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise _invalid(f"input has {len(inputs)} items; at most {MAX_EMBEDDING_INPUTS} per request", "input")
    protocol = validate(EmbeddingsRequest, body)
    if protocol.encoding_format not in (None, "float", "base64"):
        raise _invalid(f"encoding_format must be 'float' or 'base64' (got {errors.short(protocol.encoding_format)})",
                       "encoding_format")
    return EmbeddingPlan(model, inputs, protocol.encoding_format, protocol)


# --- model names ---------------------------------------------------------------------------------------------
def unknown_model(model: str, served: list[str]) -> ApiError:
    available = ", ".join(sorted(served)) or "none (no worker is registered)"
    return ApiError(errors.MODEL_NOT_FOUND,
                    f"model {model!r} is not served here; available models: {available}", "model")


# --- context length --------------------------------------------------------------------------------------------
def max_new_tokens(explicit: Optional[int], context_len: int, prompt_tokens: int, model: str,
                   default: Optional[int] = None) -> Optional[int]:
    """The max_new_tokens to send: the explicit value if it fits after the prompt (else 400); without one,
    `default` clamped to the room left, or None: the worker's default for the model, capped by the context."""
    room = context_len - prompt_tokens
    if room <= 0:
        raise ApiError(errors.CONTEXT_LENGTH_EXCEEDED,
                       f"This model's maximum context length is {context_len} tokens. However, your messages "
                       f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages.", "messages")
    if explicit is not None and explicit > room:
        raise ApiError(errors.CONTEXT_LENGTH_EXCEEDED,
                       f"max_tokens={explicit} is too large for model {model}: after this prompt, at most {room} "
                       f"tokens fit in its context window", "max_tokens")
    if explicit is None and default is not None:
        return min(default, room)
    return explicit


# --- the worker's side ------------------------------------------------------------------------------------------
def fastchat_prompt(conv: dict, messages: list[dict]) -> str:
    """The prompt FastChat's openai_api_server builds from the worker's conversation template (for FastChat's
    own worker and for token counting; the bundle's worker renders `messages` itself)."""
    from fastchat.conversation import Conversation, SeparatorStyle

    c = Conversation(name=conv["name"], system_template=conv["system_template"], system_message=conv["system_message"],
                     roles=conv["roles"], messages=list(conv["messages"]), offset=conv["offset"],
                     sep_style=SeparatorStyle(conv["sep_style"]), sep=conv["sep"], sep2=conv["sep2"],
                     stop_str=conv["stop_str"], stop_token_ids=conv["stop_token_ids"])
    for m in messages:
        if m["role"] == "system":
            c.set_system_message(m["content"])
        elif m["role"] in ("user", "tool"):
            c.append_message(c.roles[0], m["content"])
        else:
            c.append_message(c.roles[1], m["content"])
    c.append_message(c.roles[1], None)
    return c.get_prompt()


def worker_payload(model: str, s: Sampling, *, max_new_tokens: Optional[int], request_id: str,
                   messages: list[dict] | None = None, prompt: str | None = None,
                   prompt_token_ids: list[int] | None = None, template_kwargs: dict | None = None,
                   logprobs: Optional[int] = None, prompt_logprobs: Optional[int] = None, choice: int = 0,
                   extra: dict | None = None) -> dict:
    """The JSON for /worker_generate_stream (see the contract in workers/serving/api_server.py). `echo` is
    always false: the API echoes the prompt itself. With a seed, the `choice`-th of n answers is drawn with
    seed + choice: n answers differ, and each repeats."""
    payload = {
        "model": model, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
        "repetition_penalty": s.repetition_penalty, "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty, "max_new_tokens": max_new_tokens, "stop": list(s.stop),
        "stop_token_ids": [], "echo": False, "request_id": request_id,
    }
    seed = s.seed + choice if s.seed is not None else None
    asked = {"logprobs": logprobs, "prompt_logprobs": prompt_logprobs, "logit_bias": s.logit_bias, "seed": seed}
    payload.update({k: v for k, v in asked.items() if v is not None})  # absent: none asked
    if messages is not None:
        payload["messages"] = messages
    if template_kwargs:
        payload["chat_template_kwargs"] = template_kwargs
    if prompt is not None:
        payload["prompt"] = prompt
    if prompt_token_ids is not None:
        payload["prompt_token_ids"] = prompt_token_ids
    payload.update(extra or {})
    return payload


def finish_reason(reason: Any) -> str:
    """OpenAI's finish_reason for the engine's (stop, length, cancelled) or a worker chunk's."""
    return "length" if reason == "length" else "stop"


class TextDeltas:
    """The worker streams its whole text so far; this yields what is new. A trailing U+FFFD (the start of a
    character whose bytes have not all come) is held back until the character is complete or the answer ends."""

    def __init__(self) -> None:
        self.sent = ""

    def feed(self, text: str, final: bool = False) -> str:
        shown = text if final else text.rstrip("\ufffd")
        if len(shown) <= len(self.sent):
            return ""
        delta, self.sent = shown[len(self.sent):], shown
        return delta


class AnswerDeltas:
    """The new parts of a chat answer, chunk by chunk: `content` and, for a reasoning model (the worker sends
    `reasoning_content` and `content`, workers/engine/reasoning.py), `reasoning_content`, in that order."""

    FIELDS = ("reasoning_content", "content")

    def __init__(self) -> None:
        self.deltas = {name: TextDeltas() for name in self.FIELDS}

    def feed(self, chunk: dict, final: bool = False) -> list[dict]:
        """The deltas ({"reasoning_content": ...} then {"content": ...}) this chunk adds."""
        out = []
        for name, value in message_fields(chunk).items():
            delta = self.deltas[name].feed(value or "", final)
            if delta:
                out.append({name: delta})
        return out


def message_fields(chunk: dict) -> dict:
    """A worker chunk's answer as the message fields: {"content"} or, for a reasoning model, also
    {"reasoning_content"} (first; null when the model did not think)."""
    if "content" in chunk and "reasoning_content" in chunk:
        return {"reasoning_content": str(chunk["reasoning_content"] or "") or None,
                "content": str(chunk["content"] or "")}
    return {"content": str(chunk.get("text") or "")}


class Usage:
    """Token counts over choices: each prompt's tokens once (not once per `n`), every choice's completion."""

    def __init__(self) -> None:
        self.prompt: dict[Any, int] = {}
        self.completion = 0

    def add(self, prompt_key: Any, usage: dict | None) -> None:
        if not usage:
            return
        self.prompt.setdefault(prompt_key, int(usage.get("prompt_tokens") or 0))
        self.completion += int(usage.get("completion_tokens") or 0)

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt.values())

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion,
                "total_tokens": self.prompt_tokens + self.completion}


# --- logprobs: the worker's entries in OpenAI's shapes ----------------------------------------------------------
# A worker entry: {"id", "token", "bytes", "logprob" (null for a prompt's first token), "top": [{"id", "token",
# "bytes", "logprob"}] (null there too)}; see workers/serving/worker.py LogprobFeed.

def chat_logprobs(entries: list[dict]) -> dict:
    """choices[].logprobs of a chat answer (or of one stream chunk): {"content": [{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}]}]}."""
    def one(e: dict) -> dict:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}
    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e.get("top") or []]} for e in entries]}


class CompletionLogprobs:
    """choices[].logprobs of a completion, {tokens, token_logprobs, top_logprobs, text_offset}, built chunk by
    chunk: text_offset counts characters of the choice's text (with echo, the prompt's first).
    top_logprobs: each token's `top` most likely {token: logprob}, the chosen one added when not among them
    (OpenAI: up to logprobs + 1); None for a prompt's first token."""

    def __init__(self) -> None:
        self.offset = 0

    def part(self, entries: list[dict]) -> dict:
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            out["tokens"].append(e["token"])
            out["token_logprobs"].append(e["logprob"])
            if e["logprob"] is None:
                out["top_logprobs"].append(None)
            else:
                top = {t["token"]: t["logprob"] for t in e.get("top") or []}
                top.setdefault(e["token"], e["logprob"])
                out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(e["token"])
        return out


# --- stream chunks: every chunk has id, object, created, model --------------------------------------------------
DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def chat_chunk(id_: str, created: int, model: str, index: int, delta: dict, finish: Optional[str] = None,
               include_usage: bool = False, logprobs: Optional[dict] = None) -> dict:
    chunk = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
    if include_usage:
        chunk["usage"] = None
    return chunk


def completion_chunk(id_: str, created: int, model: str, index: int, text: str, finish: Optional[str] = None,
                     include_usage: bool = False, logprobs: Optional[dict] = None) -> dict:
    chunk = {"id": id_, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(id_: str, created: int, model: str, object_: str, usage: Usage) -> dict:
    return {"id": id_, "object": object_, "created": created, "model": model, "choices": [], "usage": usage.as_dict()}


# --- request size ------------------------------------------------------------------------------------------------
class BodySizeLimit:
    """Pure ASGI middleware: refuse request bodies larger than `limit` bytes with 413."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size = [], 0
        if not too_big:
            while True:
                message = await receive()
                chunks.append(message)
                size += len(message.get("body", b""))
                if size > self.limit:
                    too_big = True
                    break
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
        if too_big:
            err = ApiError(errors.REQUEST_TOO_LARGE, f"request body exceeds the limit of {self.limit} bytes")
            return await err.response()(scope, receive, send)

        async def replay():
            return chunks.pop(0) if chunks else await receive()

        return await self.app(scope, replay, send)
