"""Continuous batching: the concurrent requests of one worker decode together, one forward pass per
step for all of them. A new request is prefilled on its own and joins at the next step; a finished or
cancelled one leaves at once. Decode on a CPU is bound by reading the weights, and one pass reads
them once for every sequence in the batch, so four sequences cost little more than one.

One thread (the batcher's) runs every forward pass of the model; request threads hand their Job to
`submit()` and wait for its Result, receiving the answer text through `on_text` as it grows.

The batch shares one KV cache: each sequence's cache is left-padded to the longest, an attention mask
hides the padding, and every sequence gets its own position ids, so a sequence sees exactly its own
tokens at its own positions, as when it runs alone. Which axes of a cached tensor are batch and
sequence is family data (`Family.kv_axes`). Qwen-7B's code takes no position ids: it derives rotary
positions from the cache length, which padding shifts, so its rotary tables are shifted back per row
(`Family.pad_shifted_rotary`, `shift_rotary_by_padding`).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
from typing import Callable

import torch

from workers.engine import threads
from workers.engine.batch_thread import BatchThread
from workers.engine.generate import Job, Result
from workers.engine.prefix_cache import legacy, model_cache
from workers.engine.sequence import Sequence
from workers.models.families import Family

log = logging.getLogger("batcher")


def batch_axes(family: Family | None, model) -> tuple[int, int] | None:
    """The (batch, sequence) axes of the model's cache when its sequences can be batched, else None.

    A family of its own (ChatGLM3, Qwen) says so in its data. Any other model (a chat template, or a
    conv_template set by hand) is batched only when it runs transformers' own model code, whose
    decoder models all take position ids and a padding mask over a (batch, heads, seq, dim) cache.
    """
    own_code = type(model).__module__.startswith("transformers.")
    if family is not None and (family.model_types or family.architectures):
        return family.kv_axes
    return (0, 2) if own_code else None


class RowPads(threading.local):
    """Left padding of each row in the decode step under way on this thread (None: no padded batch)."""

    pads: torch.Tensor | None = None


def shift_rotary_by_padding(module) -> RowPads:
    """Make `module(length)` -> [cos, sin] of shape (1, length, 1, dim) give each row of a padded batch
    the tables of its own positions (column minus its padding), while `RowPads.pads` is set."""
    original, state = module.forward, RowPads()

    def forward(max_seq_len, *args, **kwargs):
        tables = original(max_seq_len, *args, **kwargs)
        if state.pads is None:
            return tables
        positions = (torch.arange(max_seq_len)[None, :] - state.pads[:, None]).clamp_(min=0)
        return [t[0, :, 0, :][positions].unsqueeze(2) for t in tables]

    module.forward = forward
    return state


@contextlib.contextmanager
def module_globals(module, values: tuple[tuple[str, object], ...]):
    """Set globals of a model's code module for the duration (Family.padded_decode_globals). Another
    thread's forward pass meanwhile (an embedding) takes the same, equally correct, code path."""
    saved = {name: getattr(module, name) for name, _ in values}
    try:
        for name, value in values:
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


class Batcher:
    """Runs the generations of one model, batched. `prefill(ids)` -> (past, last logits, reused tokens)
    is the served model's (it owns prefix reuse); `finished(seq, past)` stores a cache when wanted."""

    def __init__(self, model, axes: tuple[int, int], decode: Callable[[list[int]], str],
                 postprocess: Callable[[str], str], prefill: Callable[[list[int]], tuple],
                 finished: Callable[[list[int], tuple], None] | None = None, pad_shifted_rotary: str | None = None,
                 padded_decode_globals: tuple[tuple[str, object], ...] = ()):
        self.model, (self.batch_axis, self.seq_axis) = model, axes
        self._rotary = shift_rotary_by_padding(model.get_submodule(pad_shifted_rotary)) if pad_shifted_rotary else None
        self._padded_globals = padded_decode_globals
        self._code = sys.modules[type(model).__module__]
        self.decode, self.postprocess, self._prefill, self._finished = decode, postprocess, prefill, finished
        self._work: BatchThread[Sequence] = BatchThread("batcher", self._loop)
        self._active: list[Sequence] = []
        self._past: tuple | None = None
        self._mask: torch.Tensor | None = None  # (batch, cache length): 0 over padding
        self.steps = 0
        self.widest = 0  # the most sequences one step has decoded (for tests and logs)

    # --- the request side ------------------------------------------------------------------------

    def submit(self, job: Job, on_text: Callable[[str, int], None] | None = None) -> Result:
        """Generate for `job` in the batch; blocks until it is done (or raises what failed it)."""
        seq = Sequence.start(job, on_text, self.decode, self.postprocess)
        self._work.put(seq)
        return seq.outcome()

    @property
    def active(self) -> int:
        return len(self._active)

    # --- the batch thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            threads.align_this_thread()  # cheap; the qbits count may have been set since this thread began
            try:
                for seq in self._work.drain():
                    self._join(seq)
                if self._active:
                    self._step()
                elif self._work.idle():
                    return
            except Exception as exc:  # a bug of ours: fail what is under way rather than leave it waiting
                log.exception("batcher failed")
                self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for s in self._active:
            s.error = exc
            s.done.set()
        self._active, self._past, self._mask = [], None, None

    def _join(self, seq: Sequence) -> None:
        """Prefill a new sequence alone, take its first token, and add its cache to the batch."""
        if seq.job.cancel.is_set():
            return self._finish(seq, "cancelled", None)
        try:
            with torch.inference_mode():
                past, logits, seq.reused = self._prefill(seq.tokens)
            past = legacy(past)
        except Exception as exc:  # only this request fails; the batch goes on
            log.exception("prefill failed")
            seq.error = exc
            seq.done.set()
            return
        if seq.emit(logits):
            return self._finish(seq, None, past)
        self._add(seq, past)

    def _step(self) -> None:
        """One forward pass for every active sequence, then one new token each."""
        rows = self._active
        last = torch.tensor([[s.tokens[-1]] for s in rows], dtype=torch.long)
        positions = torch.tensor([[len(s.tokens) - 1] for s in rows], dtype=torch.long)
        mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=self._mask.dtype)], dim=1)
        padded = any(s.pad for s in rows)
        try:
            if self._rotary is not None and padded:
                self._rotary.pads = torch.tensor([s.pad for s in rows], dtype=torch.long)
            with torch.inference_mode(), module_globals(self._code, self._padded_globals if padded else ()):
                # Without padding no mask is needed (one new token sees the whole cache), as in generate().
                out = self.model(input_ids=last, attention_mask=mask if padded else None, position_ids=positions,
                                 past_key_values=model_cache(self.model, self._past), use_cache=True, return_dict=True)
        except Exception as exc:  # every sequence of the batch fails with it; the next requests start afresh
            log.exception("decode step failed for %d sequences", len(rows))
            self._fail_all(exc)
            return
        finally:
            if self._rotary is not None:
                self._rotary.pads = None
        self._past, self._mask = legacy(out.past_key_values), mask
        self.steps += 1
        self.widest = max(self.widest, len(rows))
        logits = out.logits[:, -1, :]
        leaving = []
        for i, s in enumerate(rows):
            if s.emit(logits[i:i + 1]):
                leaving.append(i)
        if leaving:
            self._leave(leaving)

    # --- the shared cache ------------------------------------------------------------------------

    def _pad(self, past: tuple, length: int) -> tuple:
        """`past` left-padded with zeros along the sequence axis to `length`."""
        def pad(t):
            missing = length - t.shape[self.seq_axis]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[self.seq_axis] = missing
            return torch.cat([t.new_zeros(shape), t], dim=self.seq_axis)
        return tuple(tuple(pad(t) for t in layer) for layer in past)

    def _add(self, seq: Sequence, past: tuple) -> None:
        own = past[0][0].shape[self.seq_axis]
        if self._past is None:
            self._past, self._mask, seq.pad = past, torch.ones(1, own, dtype=torch.long), 0
            self._active = [seq]
            return
        width = max(own, self._mask.shape[1])
        grow = width - self._mask.shape[1]
        if grow:
            for s in self._active:
                s.pad += grow
        batch = self._pad(self._past, width)
        mine = self._pad(past, width)
        self._past = tuple(tuple(torch.cat([a, b], dim=self.batch_axis) for a, b in zip(la, lb))
                           for la, lb in zip(batch, mine))
        row = torch.zeros(1, width, dtype=torch.long)
        row[0, width - own:] = 1
        self._mask = torch.cat([torch.nn.functional.pad(self._mask, (grow, 0)), row], dim=0)
        seq.pad = width - own
        self._active.append(seq)

    def _row(self, index: int, pad: int) -> tuple:
        """One sequence's own cache, without its padding (new tensors)."""
        return tuple(tuple(t.narrow(self.batch_axis, index, 1).narrow(self.seq_axis, pad, t.shape[self.seq_axis] - pad)
                           .clone() for t in layer) for layer in self._past)

    def _leave(self, indices: list[int]) -> None:
        for i in indices:
            s = self._active[i]
            keep = self._finished is not None and not s.job.cancel.is_set() and s.error is None
            past = self._row(i, s.pad) if keep else None
            self._finish(s, None, past)
        keep = [i for i in range(len(self._active)) if i not in set(indices)]
        if not keep:
            self._active, self._past, self._mask = [], None, None
            return
        self._active = [self._active[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long)
        cut = min(s.pad for s in self._active)  # columns that are padding in every row left
        self._past = tuple(tuple(t.index_select(self.batch_axis, index).narrow(self.seq_axis, cut, t.shape[self.seq_axis] - cut)
                                 for t in layer) for layer in self._past)
        self._mask = self._mask.index_select(0, index)[:, cut:]
        for s in self._active:
            s.pad -= cut

    def _finish(self, seq: Sequence, reason: str | None, past: tuple | None) -> None:
        if seq.error is None and past is not None and self._finished is not None and reason != "cancelled" \
                and not seq.job.cancel.is_set():
            try:
                self._finished(seq.cached, past)
            except Exception:  # keeping a cache is an optimisation: the answer stands
                log.exception("could not keep the prefix cache")
        seq.finish(reason)
