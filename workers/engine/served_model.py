"""A loaded model with everything needed to answer as the model itself: its chat format, stop
tokens, sampling defaults, default answer length and context length.

Requests arrive as FastChat worker-protocol dicts (from the API server or the web UI); `job()` turns
one into a generation Job with every default resolved, or raises BadRequest naming the problem.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from workers.config.schema import ModelSpec
from workers.engine import generate, prompt, threads, tool_formats
from workers.engine.constraint import GrammarError, Grammars
from workers.engine.core_share import CoreShare
from workers.engine.generate import Job
from workers.engine.prefix_cache import PrefixCache
from workers.engine.runtimes import registry
from workers.engine.runtimes.base import Engine
from workers.engine.sampling_limits import LIMITS, LOGIT_BIAS, TOP_LOGPROBS
from workers.engine.token_bytes import TokenPieces
from workers.engine.token_choice import TokenLogprob, prompt_logprobs

log = logging.getLogger("served_model")


class BadRequest(ValueError):
    """The request cannot be served as asked; the message names the problem (HTTP 400).
    `code`: the error table's code (workers/serving/errors.py)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


def _number(params: dict, key: str, default, kind=float):
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise BadRequest(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}", key)
    value = kind(value)
    low, high = LIMITS.get(key, (None, None))
    if low is not None and not (low <= value <= high):  # also refuses NaN
        raise BadRequest(f"{key}={value!r} is out of range: use {low:g} to {high:g}", key)
    return value


def _top_count(params: dict, key: str) -> int | None:
    """None (no logprobs) or how many top logprobs per token (at most chat's limit)."""
    value, most = params.get(key), max(TOP_LOGPROBS.values())
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise BadRequest(f"{key} must be an integer from 0 to {most} (top logprobs per token), got {value!r}", key)
    return value


def logit_bias(value, vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias {token id (a string in JSON): bias -100..100} with ids the model has."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"logit_bias must be an object mapping token ids to a bias from -100 to 100, got {value!r}",
                         "logit_bias")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise BadRequest(f"logit_bias: {key!r} is not a token id (an integer)", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise BadRequest(f"logit_bias: token id {token} is not in this model's vocabulary (0..{vocab_size - 1})",
                             "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not LOGIT_BIAS[0] <= bias <= LOGIT_BIAS[1]:
            raise BadRequest(f"logit_bias[{key!r}] must be a number from {LOGIT_BIAS[0]:g} to {LOGIT_BIAS[1]:g}, "
                             f"got {bias!r}", "logit_bias")
        out[token] = float(bias)
    return out


def _seed(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"seed must be an integer, got {value!r}", "seed")
    return value % 2**64  # torch.Generator takes 0..2**64-1


def _stop_strings(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise BadRequest("stop must be a string or a list of strings", "stop")


def _tools(params: dict) -> list[dict] | None:
    tools = params.get("tools")
    if tools is None:
        return None
    if not (isinstance(tools, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools)):
        raise BadRequest("tools must be a list of {name, description, parameters}", "tools")
    return tools or None


def _tool_choice(params: dict) -> str:
    """"auto" | "none" | "required" | the name of the one tool to call."""
    choice = params.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("name"), str):
        return choice["name"]
    return choice if choice in (tool_formats.AUTO, tool_formats.NONE, tool_formats.REQUIRED) else tool_formats.AUTO


@dataclass
class ServedModel:
    name: str
    folder: Path
    model: object
    tokenizer: object
    chat: prompt.ChatFormat
    sampling: dict
    max_tokens_default: int
    context_len: int
    prefixes: PrefixCache
    share: CoreShare | None = None
    engine: Engine | None = None  # the runtime's serving side: set by build()
    pieces: TokenPieces | None = None  # each token's text and bytes, for logprobs
    _grammars: Grammars | None = None

    @classmethod
    def build(cls, spec: ModelSpec, folder: Path, model, tokenizer, share: CoreShare | None = None) -> "ServedModel":
        """`model` as loader.load_model returned it; its runtime serves it."""
        config = json.loads((folder / "config.json").read_text())
        chat = prompt.ChatFormat(folder, tokenizer, config, spec.conv_template)
        served = cls(
            name=spec.program, folder=folder, model=model, tokenizer=tokenizer, chat=chat,
            sampling=prompt.sampling_defaults(folder, spec.sampling),
            max_tokens_default=prompt.max_new_tokens_default(folder, spec.max_tokens_default),
            context_len=prompt.context_length(config),
            prefixes=PrefixCache(spec.prefix_cache_tokens),
            share=share,
            pieces=TokenPieces(tokenizer),
        )
        served.engine = registry.runtime_of(model).serve(model, served, share, spec.batching)
        served.context_len = min(served.context_len, served.engine.context or served.context_len)
        log.info("%s: context %d, default answer %d tokens, sampling %s, stop ids %s, %s", spec.program,
                 served.context_len, served.max_tokens_default, served.sampling, sorted(chat.stop_token_ids),
                 served.engine.description)
        return served

    # --- prompts -------------------------------------------------------------------------------

    def prompt_ids(self, params: dict) -> list[int]:
        """The prompt token ids: rendered from `messages` in the model's own chat format (with the `tools`
        offered), or a plain text `prompt` (completions), or `prompt_token_ids` given by the client."""
        try:
            if params.get("messages") is not None:
                return self.chat.render(params["messages"], params.get("chat_template_kwargs"), _tools(params))
            if params.get("prompt_token_ids") is not None:
                ids = params["prompt_token_ids"]
                if not (isinstance(ids, list) and ids and all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids)):
                    raise BadRequest(f"prompt token ids must be a non-empty list of ids in 0..{self.vocab_size - 1}",
                                     "prompt")
                return ids
            if isinstance(params.get("prompt"), str) and params["prompt"]:
                return self.chat.encode_text(params["prompt"])
        except prompt.PromptError as exc:
            raise BadRequest(str(exc), exc.param) from None
        raise BadRequest("give messages, a non-empty prompt, or prompt token ids", "messages")

    @property
    def vocab_size(self) -> int:
        return int(getattr(self.model.config, "vocab_size", None) or getattr(self.model.config, "padded_vocab_size"))

    def count_tokens(self, params: dict) -> int:
        return len(self.prompt_ids(params))

    # --- generation ------------------------------------------------------------------------------

    def job(self, params: dict) -> tuple[Job, list[int]]:
        client_ids = self.prompt_ids(params)
        # A runtime may evaluate a token before the client's prompt (neural-speed's BOS: Engine.evaluable)
        ids = self.engine.evaluable(client_ids)
        room = self.context_len - len(ids)
        if room <= 0:
            raise BadRequest(f"the prompt has {len(ids)} tokens, which does not fit in the {self.context_len}-token "
                             f"context of model {self.name}; shorten it", "messages", "context_length_exceeded")
        asked = params.get("max_new_tokens")
        if asked is not None:
            asked = _number(params, "max_new_tokens", None, int)
            if asked < 1:
                raise BadRequest(f"max_tokens must be at least 1, got {asked}", "max_tokens")
            if asked > room:
                raise BadRequest(f"max_tokens={asked} is too large for model {self.name}: after this prompt of "
                                 f"{len(ids)} tokens, at most {room} tokens fit in its context window", "max_tokens",
                                 "context_length_exceeded")
        max_new = asked if asked is not None else min(self.max_tokens_default, room)
        extra_ids = params.get("stop_token_ids") or []
        if not (isinstance(extra_ids, list) and all(isinstance(i, int) for i in extra_ids)):
            raise BadRequest("stop_token_ids must be a list of integers", "stop_token_ids")
        s = self.sampling
        job = Job(
            prompt_ids=ids,
            max_new_tokens=max_new,
            temperature=_number(params, "temperature", s["temperature"]),
            top_p=_number(params, "top_p", s["top_p"]),
            top_k=_number(params, "top_k", s["top_k"], int),
            repetition_penalty=_number(params, "repetition_penalty", s["repetition_penalty"]),
            presence_penalty=_number(params, "presence_penalty", 0.0),
            frequency_penalty=_number(params, "frequency_penalty", 0.0),
            stop_token_ids=self.chat.stop_token_ids | frozenset(extra_ids),  # a user's stops add, never replace
            stop_strings=self.chat.stop_strings + _stop_strings(params.get("stop")),
            logprobs=_top_count(params, "logprobs"),
            prompt_logprobs=_top_count(params, "prompt_logprobs"),
            logit_bias=logit_bias(params.get("logit_bias"), self.vocab_size),
            seed=_seed(params.get("seed")),
            added_prefix=len(ids) - len(client_ids),
            thinking=self.chat.thinking(ids) if params.get("messages") is not None else None,
        )
        if job.prompt_logprobs is not None and self.engine.no_prompt_logits:
            raise BadRequest(f"model {self.name} {self.engine.no_prompt_logits}", "echo")
        if job.top_k is not None and job.top_k < 0:  # FastChat clients send -1 for "no top-k"
            job.top_k = 0
        self._constrain(job, params)
        return job, client_ids

    # --- tools and structured output ---------------------------------------------------------------

    @property
    def grammars(self) -> Grammars:
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.vocab_size)
        return self._grammars

    def _constrain(self, job: Job, params: dict) -> None:
        """Stops and grammar of a request with tools or a response_format (json_object / json_schema)."""
        tools, choice = _tools(params), _tool_choice(params)
        fmt = self.chat.tool_format
        grammar, param = None, "tools"
        if tools and fmt is not None:
            job.stop_strings += tuple(s for s in tool_formats.stop_strings(fmt) if s not in job.stop_strings)
        if tools and choice not in (tool_formats.AUTO, tool_formats.NONE):
            if fmt is None:
                raise BadRequest(f"model {self.name} has a FastChat conv_template and no tool-call format", "tools")
            if choice != tool_formats.REQUIRED and not any(t["name"] == choice for t in tools):
                raise BadRequest(f"tool_choice names {choice!r}, which is not one of the tools", "tool_choice")
            grammar = tool_formats.call_grammar(fmt, tools, choice)
        else:
            fmt_kind = (params.get("response_format") or {}).get("type")
            if fmt_kind in ("json_object", "json_schema"):
                from workers.engine.constraint import json_value

                param = "response_format"
                schema = params["response_format"].get("schema") if fmt_kind == "json_schema" else None
                try:
                    grammar = json_value(schema)
                except GrammarError as exc:
                    raise BadRequest(str(exc), param) from None
        if grammar is not None:
            try:
                constraint = self.grammars.constraint(grammar, job.stop_token_ids)
            except GrammarError as exc:
                raise BadRequest(str(exc), param) from None
            job.logits_masks += (constraint.as_mask(len(job.prompt_ids)),)  # the token chooser applies it

    def tool_calls(self, params: dict, text: str) -> tuple[str, list[dict]]:
        """(content, [{"name", "arguments"}]) of a finished answer when tools were offered (and may be called)."""
        tools, fmt = _tools(params), self.chat.tool_format
        if not tools or fmt is None or _tool_choice(params) == tool_formats.NONE:
            return text, []
        content, calls = tool_formats.parse(fmt, text, tools)
        return content, [c.as_dict() for c in calls]

    def decode(self, ids: list[int]) -> str:
        return self.chat.decode(ids)

    def batching_state(self) -> dict:
        """How this model's concurrent requests run, and what its batcher has done so far (POST /model_details)."""
        return self.engine.batching_state()

    def generate(self, job: Job, on_text=None) -> generate.Result:
        """Generate, counted as demand on the shared cores while it runs."""
        threads.align_this_thread()
        if job.prompt_logprobs is not None:
            job.prompt_entries = self.prompt_entries(job)
        if self.share is None:
            return self.engine.submit(job, on_text)
        self.share.begin()
        try:
            return self.engine.submit(job, on_text)
        finally:
            self.share.end()

    # --- logprobs ---------------------------------------------------------------------------------

    def prompt_entries(self, job: Job) -> list[TokenLogprob]:
        """The logprob of each of the client's prompt tokens given those before it (the first has none)."""
        ids = job.prompt_ids
        entries = prompt_logprobs(ids, self.engine.prompt_logits(ids), job.prompt_logprobs)[job.added_prefix:]
        return [TokenLogprob(entries[0].token, None, None)] + entries[1:]

    def logprob_json(self, entries: list[TokenLogprob]) -> list[dict]:
        """Entries as the worker sends them: {"id", "token", "bytes", "logprob", "top": [{"id", ...}]}."""
        def one(token: int, logprob: float | None) -> dict:
            text, raw = self.pieces.get(token)
            return {"id": token, "token": text, "bytes": list(raw), "logprob": logprob}
        return [{**one(e.token, e.logprob), "top": None if e.top is None else [one(t, lp) for t, lp in e.top]}
                for e in entries]

    # --- embeddings ------------------------------------------------------------------------------

    def embed(self, params: dict) -> dict:
        """One vector per input (the runtime's embeddings()), with the inputs checked here."""
        if self.engine.no_embeddings:
            raise BadRequest(f"model {self.name} {self.engine.no_embeddings}", "model")
        inputs = params.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise BadRequest("input must be a non-empty string, list of strings, or token ids", "input")
        token_ids = []
        for item in inputs:
            if isinstance(item, str) and item:
                ids = self.chat.encode_text(item)
            elif isinstance(item, list) and item and all(isinstance(i, int) and 0 <= i < self.vocab_size for i in item):
                ids = item
            else:
                raise BadRequest("each input must be a non-empty string or a list of token ids", "input")
            if len(ids) > self.context_len:
                raise BadRequest(f"an input has {len(ids)} tokens; model {self.name} takes at most "
                                 f"{self.context_len}", "input", "context_length_exceeded")
            token_ids.append(ids)
        threads.align_this_thread()
        vectors = self.engine.embeddings(token_ids)
        return {"embedding": vectors, "token_num": sum(len(ids) for ids in token_ids)}
