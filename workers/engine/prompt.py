"""A model's own chat format: prompt token ids, stop tokens, answer clean-up, sampling defaults.

`ChatFormat(folder, tokenizer, config, conv_template)` is what a worker builds once per model:

- `render(messages, template_kwargs)`: OpenAI-style messages -> the prompt token ids the model's own
  chat code feeds to generate(): `apply_chat_template` for a tokenizer with a chat template (the
  request's `chat_template_kwargs` become template variables, e.g. Qwen3's `enable_thinking`), ChatGLM3's
  `build_chat_input`, Qwen-7B-Chat's ChatML (`make_context`, default system prompt included), or,
  when `models[].conv_template` is set, FastChat's conversation template of that name;
- `encode_text(text)`: plain text for /v1/completions, with a BOS where the model needs one;
- `stop_token_ids`: eos ids of config.json and generation_config.json, the tokenizer's eos, the
  family's turn-end tokens (and the FastChat template's stop ids); `stop_strings`: the template's;
- `decode(ids)`: answer ids (stop token excluded) to text as the family's chat() decodes them;
- `postprocess(text)`: what the family's chat() does to the decoded answer;
- `thinking(prompt_ids)`: for a reasoning model, its thinking markers and whether this prompt opened
  the thinking block (engine/reasoning.py splits the answer by them), else None.

The family data (which format, which tokens) lives in workers/models/families.py.
"""
from __future__ import annotations

import inspect
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping

from transformers import PretrainedConfig

from workers.engine import tool_formats
from workers.engine.reasoning import Thinking, opened_by_prompt
from workers.models import families
from workers.models.families import Family, UnknownFamily, read_json

ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_CONTEXT_LENGTH = 2048
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")
# config.json keys naming the context window, most specific first (chatglm/qwen: seq_length).
CONTEXT_KEYS = ("max_position_embeddings", "seq_length", "max_sequence_length", "n_positions", "max_seq_len",
                "n_ctx", "model_max_length")
QWEN_DEFAULT_WINDOW = 6144  # make_context's default max_window_size
# Names apply_chat_template (transformers 4.40) passes to the template itself or takes as its own
# arguments: a request's chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "add_generation_prompt", "chat_template", "tokenize", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "tokenizer_kwargs", "tools", "documents", "raise_exception",
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
    "additional_special_tokens"})


class PromptError(ValueError):
    """The messages cannot be rendered in this model's chat format (a client error)."""

    param = "messages"  # the request field at fault


class TemplateKwargsError(PromptError):
    param = "chat_template_kwargs"


def _config_dict(folder: Path, config) -> dict:
    if config is None:
        return read_json(Path(folder) / "config.json")
    if isinstance(config, PretrainedConfig):
        return config.to_dict()
    return dict(config)


def _ids(value) -> list[int]:
    """An eos_token_id field (int, list of ints, or None) as a list."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int)]
    return []


def token_id(tokenizer, token: str) -> int | None:
    """The id of `token` when the tokenizer has it as one token, else None (no unk fallbacks)."""
    try:
        tid = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(tid, int) or tid < 0:
            return None
        back = tokenizer.convert_ids_to_tokens(tid)
    except (KeyError, ValueError, IndexError, TypeError, AssertionError):
        return None
    if isinstance(back, bytes):
        back = back.decode("utf-8", errors="replace")
    return tid if back == token else None


def _template_text(tokenizer) -> str:
    return tool_formats.template_text(tokenizer)


def normalize_messages(messages: Any) -> list[dict]:
    """[{"role", "content": str}], checked: known roles, text content, ending with a user message (or a
    tool result). An assistant message may carry "tool_calls" [{"id", "name", "arguments"}] (its content
    may then be empty), a tool message "tool_call_id" and "name".

    Content given as OpenAI content parts is accepted when every part is text (joined).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError("messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise PromptError(f"messages[{i}] is not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise PromptError(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        if isinstance(content, list):
            if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise PromptError(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        calls = m.get("tool_calls") if role == "assistant" else None
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise PromptError(f"messages[{i}].content must be a string")
        item = {"role": role, "content": content}
        if calls:
            if not (isinstance(calls, list) and all(isinstance(c, Mapping) and isinstance(c.get("name"), str)
                                                    and isinstance(c.get("arguments"), str) for c in calls)):
                raise PromptError(f"messages[{i}].tool_calls must be a list of {{id, name, arguments}}")
            item["tool_calls"] = [dict(c) for c in calls]
        if role == "tool":
            if not out or not (out[-1].get("tool_calls") or out[-1]["role"] == "tool"):
                raise PromptError(f"messages[{i}] is a tool result, but no assistant message with tool_calls "
                                  f"comes right before it")
            item["tool_call_id"], item["name"] = m.get("tool_call_id"), m.get("name")
        out.append(item)
    if out[-1]["role"] not in ("user", "tool"):
        raise PromptError(f"the last message must be from the user or a tool result (it is {out[-1]['role']!r})")
    return out


def _uses_tools(messages: list[dict], tools) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def checked_template_kwargs(value: Any) -> dict:
    """A request's chat_template_kwargs, checked: an object whose keys are not names the template
    machinery sets itself (RESERVED_TEMPLATE_KWARGS). Other keys reach the template as variables; a
    template that does not read one ignores it (as vLLM and SGLang do)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TemplateKwargsError(f"chat_template_kwargs must be an object like {{\"enable_thinking\": false}} "
                          f"(got {type(value).__name__})")
    reserved = sorted(k for k in value if k in RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise TemplateKwargsError(f"chat_template_kwargs may not set {', '.join(reserved)}: the chat template machinery "
                          f"sets it itself")
    return dict(value)


def _split_system_and_turns(messages: list[dict], fmt: str) -> tuple[str | None, list[dict]]:
    """(system or None, turns) where turns alternate user, assistant, ..., user."""
    system, turns = None, messages
    if turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            where = "only first" if m["role"] == "system" else "alternating user and assistant"
            raise PromptError(
                f"{fmt} takes an optional system message first, then turns alternating user and assistant "
                f"ending with user; messages[{i + (system is not None)}] is {m['role']!r} ({where})"
            )
    return system, turns


class ChatFormat:
    """The chat format of one model folder (see the module docstring)."""

    def __init__(self, folder: Path, tokenizer, config: Mapping | PretrainedConfig | None = None,
                 conv_template: str | None = None):
        self.folder = Path(folder)
        self.tokenizer = tokenizer
        self.config = _config_dict(self.folder, config)
        self.generation_config = read_json(self.folder / "generation_config.json")
        self.conv_template = conv_template
        stop_strings: list[str] = []
        extra_stop_ids: list[int] = []
        if conv_template is not None:
            from fastchat.conversation import get_conv_template

            try:
                conv = get_conv_template(conv_template)
            except KeyError:
                raise UnknownFamily(f"conv_template {conv_template!r} is not a FastChat conversation template") from None
            self.family: Family | None = families.family_for_config(self.config)
            self.kind = f"fastchat:{conv_template}"
            extra_stop_ids += list(conv.stop_token_ids or ())
            stop = conv.stop_str
            stop_strings += [stop] if isinstance(stop, str) else list(stop or ())
        else:
            self.family = families.resolve(self.config, tokenizer)
            self.kind = self.family.prompt
        self.stop_strings: tuple[str, ...] = tuple(s for s in stop_strings if s)
        self.stop_token_ids: frozenset[int] = frozenset(self._stop_ids(extra_stop_ids))
        self.reasoning = None if conv_template is not None else families.reasoning_markers(
            self.config, lambda text: token_id(tokenizer, text) is not None, _template_text(tokenizer))

    # ------------------------------------------------------------------------------- stops

    def eos_token_ids(self) -> set[int]:
        found = set(_ids(self.config.get("eos_token_id"))) | set(_ids(self.generation_config.get("eos_token_id")))
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        return found | set(_ids(tok_eos))

    def turn_end_tokens(self) -> tuple[str, ...]:
        if self.family is not None and self.family.turn_end_tokens:
            return self.family.turn_end_tokens
        if self.kind == families.PROMPT_CHAT_TEMPLATE:
            text = _template_text(self.tokenizer)
            return tuple(t for t in families.TEMPLATE_TURN_ENDS if t in text)
        return ()

    def _stop_ids(self, extra: Iterable[int]) -> set[int]:
        ids = self.eos_token_ids() | set(extra)
        for token in self.turn_end_tokens():
            tid = token_id(self.tokenizer, token)
            if tid is not None:
                ids.add(tid)
        return ids

    # ------------------------------------------------------------------------------ prompts

    @property
    def tool_format(self) -> str | None:
        """The model's tool-call protocol (tool_formats), None under a FastChat conv_template."""
        if self.conv_template is not None:
            return None
        return tool_formats.format_for(self.family, self.tokenizer)

    def render(self, messages: list[dict], template_kwargs: Mapping | None = None,
               tools: list[dict] | None = None) -> list[int]:
        """The prompt token ids for `messages` (the last one from the user, or a tool result), ready for
        generate(). `template_kwargs` (a request's chat_template_kwargs) reach a chat template as variables;
        the other formats have no template variables and ignore them. `tools` ([{"name", "description",
        "parameters"}]) are offered in the model's own way."""
        messages = normalize_messages(messages)
        kwargs = checked_template_kwargs(template_kwargs)
        if _uses_tools(messages, tools):
            return self._render_with_tools(messages, tools or None, kwargs)
        if self.conv_template is not None:
            return self._render_fastchat(messages)
        if self.kind == families.PROMPT_CHATGLM3:
            return self._render_chatglm3(messages)
        if self.kind == families.PROMPT_QWEN_CHATML:
            return self._render_qwen(messages)
        return self._render_chat_template(messages, kwargs)

    def _render_with_tools(self, messages: list[dict], tools: list[dict] | None, kwargs: dict) -> list[int]:
        if self.conv_template is not None:
            raise PromptError(f"tools and tool messages need the model's own chat format; FastChat template "
                              f"{self.conv_template!r} (models[].conv_template) has no tool-call format")
        try:
            if self.kind == families.PROMPT_CHATGLM3:
                history, query, role = tool_formats.chatglm3_turns(messages, tools)
                encoded = self.tokenizer.build_chat_input(query, history=history, role=role)
                ids = encoded["input_ids"]
                return [int(i) for i in (ids[0].tolist() if hasattr(ids, "tolist") else ids[0])]
            if self.kind == families.PROMPT_QWEN_CHATML:
                default = self.family.default_system if self.family else ""
                system, pairs, question, open_answer = tool_formats.qwen_react_turns(messages, tools, default or "")
                return self._qwen_tokens(system, pairs, question, open_answer)
        except ValueError as exc:
            raise PromptError(str(exc)) from None
        takes = tool_formats.template_takes_tools(self.tokenizer)
        return self._render_chat_template(tool_formats.template_messages(messages, tools, takes), kwargs,
                                          tools=tool_formats._openai_tools(tools) if (takes and tools) else None)

    def _render_chat_template(self, messages: list[dict], kwargs: dict | None = None,
                              tools: list[dict] | None = None) -> list[int]:
        from jinja2 import TemplateError

        try:
            if tools and "tools" not in inspect.signature(self.tokenizer.apply_chat_template).parameters:
                # transformers 4.40's apply_chat_template passes no `tools` to the template: render it here as
                # apply_chat_template does (its compiled template, the special tokens as variables).
                template = self.tokenizer._compile_jinja_template(self.tokenizer.chat_template)
                text = template.render(messages=messages, tools=tools, add_generation_prompt=True,
                                       **self.tokenizer.special_tokens_map, **(kwargs or {}))
                return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]
            extra = {"tools": tools} if tools else {}
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra, **(kwargs or {}))
        except TemplateError as exc:  # e.g. "Conversation roles must alternate user/assistant/..."
            raise PromptError(f"the model's chat template refuses these messages: {exc}") from None
        return [int(i) for i in ids]

    def _render_chatglm3(self, messages: list[dict]) -> list[int]:
        # ChatGLM3's history is a list of role items (any order); the query is the last user message.
        history = [{"role": m["role"], "content": m["content"], **({"metadata": ""} if m["role"] == "assistant" else {})}
                   for m in messages[:-1]]
        encoded = self.tokenizer.build_chat_input(messages[-1]["content"], history=history, role="user")
        ids = encoded["input_ids"]
        return [int(i) for i in (ids[0].tolist() if hasattr(ids, "tolist") else ids[0])]

    def _render_qwen(self, messages: list[dict]) -> list[int]:
        """qwen_generation_utils.make_context(chat_format="chatml"), as Qwen-7B-Chat's chat() calls it."""
        system, turns = _split_system_and_turns(messages, "Qwen-7B-Chat's chat format")
        if system is None:
            system = self.family.default_system if self.family else ""
        pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns) - 1, 2)]
        return self._qwen_tokens(system, pairs, turns[-1]["content"])

    def _qwen_tokens(self, system: str, pairs: list[tuple[str, str]], question: str,
                     open_answer: str | None = None) -> list[int]:
        """make_context's tokens; with `open_answer`, the last assistant turn left open for the model to
        continue (Qwen's openai_api.py text_complete_last_message, after a tool result)."""
        tok = self.tokenizer
        window = self.generation_config.get("max_window_size") or QWEN_DEFAULT_WINDOW
        im_start, im_end = [tok.im_start_id], [tok.im_end_id]
        nl = tok.encode("\n")

        def part(role: str, content: str) -> list[int]:
            return tok.encode(role, allowed_special=set()) + nl + tok.encode(content, allowed_special=set())

        system_tokens = im_start + part("system", system) + im_end
        context: list[int] = []
        for query, response in reversed(pairs):  # whole (query, response) pairs, newest first, while they fit
            more = nl + im_start + part("user", query) + im_end + nl + im_start + part("assistant", response) + im_end
            if len(system_tokens) + len(more) + len(context) < window:
                context = more + context
            else:
                break
        if open_answer is not None:
            return (system_tokens + context + nl + im_start + part("user", question) + im_end + nl
                    + im_start + part("assistant", open_answer))
        return (system_tokens + context + nl + im_start + part("user", question) + im_end + nl
                + im_start + tok.encode("assistant") + nl)

    def _render_fastchat(self, messages: list[dict]) -> list[int]:
        from fastchat.conversation import get_conv_template

        conv = get_conv_template(self.conv_template)
        system, turns = _split_system_and_turns(messages, f"FastChat template {self.conv_template!r}")
        if system is not None:
            conv.set_system_message(system)
        for i, m in enumerate(turns):
            conv.append_message(conv.roles[i % 2], m["content"])
        conv.append_message(conv.roles[1], None)
        return list(self.tokenizer(conv.get_prompt()).input_ids)

    def encode_text(self, text: str) -> list[int]:
        """Plain text (for /v1/completions) as the tokenizer encodes it, with a BOS where the model needs one.

        The tokenizer's own special tokens are added (ChatGLM3: [gMASK] sop; Llama: <s>); a BOS is
        prepended when the family says so or, for a chat-template model, its template writes bos_token.
        """
        if not isinstance(text, str):
            raise PromptError("prompt must be a string")
        ids = [int(i) for i in self.tokenizer.encode(text)]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and self._plain_text_bos() and ids[:1] != [bos]:
            ids = [bos] + ids
        if not ids:
            raise PromptError("the prompt is empty")
        return ids

    def _plain_text_bos(self) -> bool:
        if self.family is not None and self.family.plain_text_bos is not None:
            return self.family.plain_text_bos
        return "bos_token" in _template_text(self.tokenizer)

    def decode(self, ids: list[int]) -> str:
        """Generated ids (without the stop token) as text, decoded the way the family's chat() does:
        ChatGLM3 and Qwen keep special tokens (Qwen: invalid UTF-8 becomes U+FFFD), other models skip
        them. Ids the tokenizer has no entry for are dropped: a model's embedding is often larger than
        its vocabulary (Qwen: 151,936 rows, 151,851 tokens; tiktoken panics on the rest)."""
        ids = [int(i) for i in ids if 0 <= int(i) < self._decodable]
        skip = True if self.family is None else self.family.decode_skip_special_tokens
        return self._decode_ints(ids, skip_special_tokens=skip)

    @cached_property
    def _decode_ints(self):
        """The tokenizer's decode() for a list of ints: where it is transformers' own, the _decode() that it calls
        after running every id through to_py_obj, which on a small model costs a visible share of each streamed
        token's time (docs/benchmarks.md, 'Figures behind constants in the code'); else decode() itself."""
        from transformers import PreTrainedTokenizerBase

        if type(self.tokenizer).decode is PreTrainedTokenizerBase.decode:
            return self.tokenizer._decode
        return self.tokenizer.decode

    @cached_property
    def _decodable(self) -> int:
        """Ids below this have a tokenizer entry. Once: a fast tokenizer's len() is slow on a large vocabulary
        and decode() runs for every streamed token of every sequence (figure: docs/benchmarks.md,
        'Figures behind constants in the code')."""
        return max(len(self.tokenizer), getattr(self.tokenizer, "vocab_size", 0) or 0)

    def postprocess(self, text: str) -> str:
        """The family's chat() clean-up of a whole decoded answer (ChatGLM3: strip, [[训练时间]]; Qwen: strip).

        Not applied under a conv_template override (FastChat's own path would not either).
        """
        if self.conv_template is not None or self.family is None:
            return text
        return self.family.postprocess_text(text)

    def thinking(self, prompt_ids: list[int]) -> Thinking | None:
        """How the answer to this rendered chat prompt carries its thinking; None for a model that does not reason."""
        if self.reasoning is None:
            return None
        start, end = self.reasoning.start, self.reasoning.end
        opened = opened_by_prompt(prompt_ids, token_id(self.tokenizer, start), token_id(self.tokenizer, end),
                                  lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False))
        return Thinking(start, end, opened)

    def describe(self) -> str:
        """One line for the worker's log."""
        family = self.family.name if self.family else "unknown family"
        return f"prompt {self.kind} ({family}), stop ids {sorted(self.stop_token_ids)}" + (
            f", stop strings {list(self.stop_strings)}" if self.stop_strings else "") + (
            f", thinking {self.reasoning.start}...{self.reasoning.end}" if self.reasoning else "")


# ----------------------------------------------------------------------------------- defaults

def _override_value(override, key: str):
    if override is None:
        return None
    if isinstance(override, Mapping):
        return override.get(key)
    return getattr(override, key, None)


def sampling_defaults(folder: Path, override=None) -> dict:
    """temperature, top_p, top_k, repetition_penalty for what a request leaves out.

    Field by field, first given wins: conf `models[].sampling` (`override`, a schema.Sampling or a
    dict), the values the family's own chat() passes itself (ChatGLM3: temperature 0.8, top_p 0.8),
    the model's generation_config.json (do_sample is not looked at: its values are kept), neutral
    (temperature 1, top_p 1, top_k -1 = off, repetition_penalty 1). top_k 0 also means off.
    """
    folder = Path(folder)
    generation = read_json(folder / "generation_config.json")
    family = families.family_for_config(read_json(folder / "config.json"))
    out = dict(families.NEUTRAL_SAMPLING)
    for key in SAMPLING_KEYS:
        if isinstance(generation.get(key), (int, float)) and not isinstance(generation.get(key), bool):
            out[key] = generation[key]
    for key, value in (family.chat_sampling if family else ()):
        out[key] = value
    for key in SAMPLING_KEYS:
        value = _override_value(override, key)
        if value is not None:
            out[key] = value
    out["top_k"] = int(out["top_k"])
    for key in ("temperature", "top_p", "repetition_penalty"):
        out[key] = float(out[key])
    return out


def max_new_tokens_default(folder: Path, conf_value: int | None = None) -> int:
    """Answer length when a request gives none: conf max_tokens_default, generation_config's
    max_new_tokens, else 512."""
    if conf_value is not None:
        return int(conf_value)
    value = read_json(Path(folder) / "generation_config.json").get("max_new_tokens")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return DEFAULT_MAX_NEW_TOKENS


def context_length(config: Mapping | PretrainedConfig) -> int:
    """The context window config.json states (max_position_embeddings, seq_length for ChatGLM/Qwen,
    n_positions, ...; a multimodal config's text_config), else 2048. Rope scaling is not applied."""
    data = config.to_dict() if isinstance(config, PretrainedConfig) else dict(config)
    for source in (data, data.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return DEFAULT_CONTEXT_LENGTH
