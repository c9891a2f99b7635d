"""Constrained decoding: a grammar that every next token must keep the answer inside (xgrammar).

`Grammars(tokenizer, vocab_size)` is built once per served model (lazily: the tokenizer's vocabulary is
read on the first constrained request); `Grammars.constraint(grammar, stop_ids)` gives one request its
own `Constraint`, which each runtime's sampling step calls:

    constraint.mask(logits)   # before choosing: tokens the grammar forbids get -inf (in place)
    constraint.accept(token)  # after choosing

Once the grammar is complete only the request's stop tokens are allowed, so the answer ends there.
JSON is generated without free white space (no space runs a random-weight model could loop in), and
object properties the schema does not name are not generated (xgrammar's strict mode), which still
validates against the schema.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Iterable

import torch

log = logging.getLogger("constraint")

# xgrammar's tvm_ffi otherwise JIT-compiles a torch DLPack addon with the C++ compiler on every import (tens of
# seconds of CPU per worker start, a temporary folder left in /tmp each time, and on torch 2.3 the build fails
# anyway); the addon only speeds up GPU tensor exchange.
os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
import xgrammar as xgr  # noqa: E402


class GrammarError(ValueError):
    """A schema or grammar the constraint library cannot compile (a client error)."""


def literal(text: str) -> "xgr.Grammar":
    """A grammar matching exactly `text`."""
    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


def json_value(schema: dict | None) -> "xgr.Grammar":
    """JSON of `schema` (None: any JSON object), compact."""
    try:
        if schema is None:
            return xgr.Grammar.from_json_schema({"type": "object"}, any_whitespace=False, strict_mode=False)
        return xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError/InvalidJSONError with its reason
        raise GrammarError(f"the JSON schema cannot be used for constrained decoding: {exc}") from None


def sequence(*parts: "xgr.Grammar") -> "xgr.Grammar":
    return xgr.Grammar.concat(*parts) if len(parts) > 1 else parts[0]


def either(*alternatives: "xgr.Grammar") -> "xgr.Grammar":
    return xgr.Grammar.union(*alternatives) if len(alternatives) > 1 else alternatives[0]


class Constraint:
    """One request's grammar state."""

    def __init__(self, compiled, stop_ids: Iterable[int], vocab_size: int):
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_ids) or None)
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits (1, vocab) of every token the grammar forbids now to -inf, in place."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        xgr.apply_token_bitmask_inplace(logits, self.bitmask, vocab_size=min(self.vocab_size, logits.shape[-1]))
        if logits.shape[-1] > self.vocab_size:
            logits[..., self.vocab_size:] = float("-inf")

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated() and not self.matcher.accept_token(int(token)):
            log.warning("the grammar refused token %d it had allowed", token)

    @property
    def complete(self) -> bool:
        return self.matcher.is_terminated()

    def as_mask(self, prompt_len: int):
        """The constraint as an additive mask function of the tokens so far, `mask(ids) -> (1, vocab)`: it accepts
        the tokens chosen since its last call (ids after the prompt), then gives 0 for allowed, -inf for forbidden."""
        seen = [prompt_len]

        def mask(ids: list[int]) -> torch.Tensor:
            for token in ids[seen[0]:]:
                self.accept(token)
            seen[0] = len(ids)
            additive = torch.zeros(1, self.vocab_size)
            self.mask(additive)
            return additive

        return mask


class Grammars:
    """The compiler for one model's tokenizer, with its vocabulary read once (on first use)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._compiler = None
        self._lock = threading.Lock()

    @property
    def compiler(self) -> "xgr.GrammarCompiler":
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def constraint(self, grammar: "xgr.Grammar", stop_ids: Iterable[int]) -> Constraint:
        try:
            compiled = self.compiler.compile_grammar(grammar)
        except Exception as exc:
            raise GrammarError(f"the grammar cannot be compiled: {exc}") from None
        return Constraint(compiled, stop_ids, self.vocab_size)
