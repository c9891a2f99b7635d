"""One generation's decode state, shared by the engine's runners (the batcher for transformers
models, the neural-speed runners): choosing each next token (engine/token_choice.py, as generate()
does), streaming the answer text, and the Result when it is done.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from workers.engine.generate import Job, Result, TextAssembler
from workers.engine.token_choice import TokenChooser

log = logging.getLogger("sequence")


@dataclass
class Sequence:
    job: Job
    on_text: Callable[[str, int], None] | None
    assembler: TextAssembler
    chooser: TokenChooser
    submitted: float
    reused: int = 0                # prompt tokens taken from the prefix cache
    tokens: list[int] = field(default_factory=list)  # prompt + generated so far
    generated: int = 0
    first_token: float | None = None
    pad: int = 0                   # left padding of its row in the batch cache
    result: Result | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, job: Job, on_text, decode: Callable[[list[int]], str], postprocess: Callable[[str], str]):
        return cls(job, on_text, TextAssembler(decode, postprocess, job.stop_strings), TokenChooser(job),
                   time.monotonic(), tokens=list(job.prompt_ids))

    def emit(self, logits: torch.Tensor) -> bool:
        """Choose the next token from its logits (1, vocab); True when the sequence is done."""
        job = self.job
        if job.cancel.is_set():
            return True
        token = self.chooser.choose(torch.tensor([self.tokens], dtype=torch.long), logits)
        if self.first_token is None:
            self.first_token = time.monotonic()
        self.tokens.append(token)
        self.generated += 1
        if token in job.stop_token_ids:
            return True
        text = self.assembler.add(token)
        if text is not None and self.on_text is not None:
            try:
                self.on_text(text, len(self.assembler.ids))
            except Exception as exc:  # this request fails (its submitter gets the error); the others go on
                log.exception("streaming a request's text failed")
                self.error = exc
                return True
        return self.assembler.stopped_by_string or self.generated >= job.max_new_tokens

    def finish(self, reason: str | None = None) -> Result | None:
        """Set (and return) the Result; None when it failed while streaming (the submitter raises)."""
        if self.error is not None:
            self.done.set()
            return None
        end = time.monotonic()
        reason, text = self.assembler.conclude(self.job, self.tokens[-1] if self.generated else None, reason)
        self.result = Result(
            text=text, completion_tokens=len(self.assembler.ids), finish_reason=reason,
            first_token_s=(self.first_token - self.submitted) if self.first_token else None,
            decode_s=(end - self.first_token) if self.first_token else 0.0, reused_tokens=self.reused,
        )
        self.done.set()
        return self.result

    @property
    def cached(self) -> list[int]:
        """The tokens a cache holds after this sequence: the last token was chosen but never fed."""
        return self.tokens[:-1]

    def outcome(self) -> Result:
        """Wait for the result (raising what failed the request)."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result
