"""One generation, run by the model's own `generate()` (so every family's own cache, position and
stop handling apply), streamed token by token, cancellable between decode steps.

The worker calls `run(job, on_text)` in a thread; `on_text` receives the cumulative answer text each
time it grows by a stable piece. Text is held back while it might still change: an incomplete UTF-8
character at the end (U+FFFD), trailing white space the family's post-processing would strip, or the
start of a stop string. So the concatenated stream always equals the final, non-streamed text.
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from workers.engine.prefix_cache import model_cache, takes_cache_objects
from workers.engine.reasoning import Thinking
from workers.engine.token_choice import ChosenTokenProcessor, TokenChooser, TokenLogprob

log = logging.getLogger("generate")


@dataclass
class Job:
    """What one request asks for, with every default already resolved by the worker."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    cancel: threading.Event = field(default_factory=threading.Event)
    logprobs: int | None = None  # None: no logprobs; else how many top logprobs to record per token
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions with echo)
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    # Additive masks on the logits, each `mask(ids) -> tensor (1, vocab) | None` (structured output)
    logits_masks: tuple[Callable[[list[int]], torch.Tensor | None], ...] = ()
    chosen_logprobs: list[TokenLogprob] = field(default_factory=list)  # filled by the chooser as it goes
    prompt_entries: list[TokenLogprob] | None = None  # filled before generating when prompt_logprobs is set
    added_prefix: int = 0  # tokens a runtime evaluates before the client's prompt (neural-speed's BOS)
    thinking: Thinking | None = None  # a reasoning model's chat answer: how its thinking is marked


@dataclass
class Result:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    first_token_s: float | None = None
    decode_s: float = 0.0
    cached_ids: list[int] | None = None  # the tokens `past` covers (prompt + answer but its last token)
    past: object = None
    reused_tokens: int = 0


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def prefill(model, ids: list[int], past, start: int, batched: bool = True):
    """Extend `past` (the cache of ids[:start], or None) over ids[start:]: one forward pass, or one per
    token for model code that cannot mask a multi-token continuation (Family.batched_continuation).
    Returns the new cache and the logits (1, vocab) after the last token."""
    step = len(ids) if batched else 1
    logits = None
    with torch.inference_mode():
        for begin in range(start, len(ids), step):
            end = min(begin + step, len(ids))
            x = torch.tensor([ids[begin:end]], dtype=torch.long)
            positions = torch.arange(begin, end, dtype=torch.long)[None]
            out = model(input_ids=x, past_key_values=model_cache(model, past), position_ids=positions, use_cache=True,
                        return_dict=True)
            past, logits = out.past_key_values, out.logits[:, -1, :]
    return past, logits


class _Cancelled(StoppingCriteria):
    def __init__(self, job: Job, stop_strings_hit: Callable[[], bool]):
        self.job, self.stop_strings_hit = job, stop_strings_hit

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        done = self.job.cancel.is_set() or self.stop_strings_hit()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)


class _TokenStreamer(BaseStreamer):
    """generate() pushes the prompt first, then one token per step."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.on_token(token)

    def end(self):
        pass


class TextAssembler:
    """Turns generated ids into the answer text, as stable prefixes for streaming.

    `decode(ids)` is the tokenizer's decode; `postprocess(text)` the family's text fix-up (e.g.
    ChatGLM3 strips and replaces placeholders). Both are applied to the whole answer every time,
    which is what the non-streamed answer gets, and only a prefix that can no longer change is sent.
    """

    def __init__(self, decode: Callable[[list[int]], str], postprocess: Callable[[str], str],
                 stop_strings: tuple[str, ...]):
        self.decode, self.postprocess, self.stop_strings = decode, postprocess, tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.sent = ""
        self.stopped_by_string = False

    def _raw(self) -> tuple[str, bool]:
        text = self.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], True
        return text, False

    def add(self, token: int) -> str | None:
        """Add a token; return the new cumulative text when a stable piece grew, else None."""
        self.ids.append(token)
        raw, hit = self._raw()
        if hit:
            self.stopped_by_string = True
            return None  # the final text is sent by finish()
        raw = raw.rstrip("\ufffd")  # an incomplete character: wait for its next bytes
        for s in self.stop_strings:  # hold back what may be the start of a stop string
            for k in range(min(len(s) - 1, len(raw)), 0, -1):
                if raw.endswith(s[:k]):
                    raw = raw[:-k]
                    break
        stable = self.postprocess(raw).rstrip()
        if len(stable) > len(self.sent) and stable.startswith(self.sent):
            self.sent = stable
            return stable
        return None

    def finish(self) -> str:
        raw, _ = self._raw()
        return self.postprocess(raw)

    def conclude(self, job: Job, last_token: int | None, reason: str | None = None) -> tuple[str, str]:
        """Why the answer ended, unless `reason` says (cancelled; stop: a stop string or token, or the model's own
        end; length: max_new_tokens reached), and its final text."""
        if reason is None:
            if job.cancel.is_set():
                reason = "cancelled"
            elif self.stopped_by_string or (last_token is not None and last_token in job.stop_token_ids):
                reason = "stop"
            else:
                reason = "length" if len(self.ids) >= job.max_new_tokens else "stop"
        text = self.finish()
        if reason == "length":  # cut inside a character: its first bytes decode to U+FFFD, not a character
            text = text.rstrip("\ufffd")
        return reason, text


def run(model, tokenizer_decode: Callable[[list[int]], str], postprocess: Callable[[str], str], job: Job,
        on_text: Callable[[str, int], None] | None = None, pad_token_id: int | None = None,
        past=None, keep_cache: bool = False) -> Result:
    """Generate for `job` with the model's own generate(); on_text(cumulative_text, tokens) while it grows.

    `past`: the KV cache of every prompt token but the last (prefix reuse); generate() then
    processes only the last one. `keep_cache`: return the final cache in the Result.
    """
    assembler = TextAssembler(tokenizer_decode, postprocess, job.stop_strings)
    t0 = time.monotonic()
    first: list[float] = []
    last_token: list[int] = []

    generated: list[int] = []

    def on_token(token: int) -> None:
        if not first:
            first.append(time.monotonic())
        last_token[:] = [token]
        generated.append(token)
        if token in job.stop_token_ids:
            return
        text = assembler.add(token)
        if text is not None and on_text is not None:
            on_text(text, len(assembler.ids))

    # The chooser (engine/token_choice.py) applies the job's penalties and sampling and picks each token;
    # generate() runs greedy over its choice, with its own repetition penalty and warpers off.
    processors = LogitsProcessorList([ChosenTokenProcessor(TokenChooser(job))])
    input_ids = torch.tensor([job.prompt_ids], dtype=torch.long)
    extra = {}
    if past is not None or takes_cache_objects(model):
        extra["past_key_values"] = model_cache(model, past)
    if past is not None:
        if _accepts(model.prepare_inputs_for_generation, "is_first_forward"):
            extra["is_first_forward"] = False  # ChatGLM3: feed only the last token on the first step
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=job.max_new_tokens,
            eos_token_id=sorted(job.stop_token_ids) or None,
            pad_token_id=pad_token_id if pad_token_id is not None else (min(job.stop_token_ids) if job.stop_token_ids else 0),
            repetition_penalty=1.0,
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([_Cancelled(job, lambda: assembler.stopped_by_string)]),
            streamer=_TokenStreamer(on_token),
            return_dict_in_generate=keep_cache,
            **extra,
            do_sample=False, temperature=None, top_p=None, top_k=None,
        )
    end = time.monotonic()
    reason, text = assembler.conclude(job, last_token[0] if last_token else None)
    return Result(
        text=text,
        completion_tokens=len(assembler.ids),
        finish_reason=reason,
        first_token_s=(first[0] - t0) if first else None,
        decode_s=(end - first[0]) if first else 0.0,
        cached_ids=(job.prompt_ids + generated[:-1]) if keep_cache else None,
        past=getattr(out, "past_key_values", None) if keep_cache else None,
    )
