"""Continuous batching over KV cache slots: the concurrent requests of one worker decode together, one
evaluate_rows() call per step for all of them. The neural-speed runtime (on graphs that batch, family data
`continuous_batching`) and the llama.cpp runtime drive their models through it.

The model keeps one KV cache per *slot* (a SlotModel). Row i of an evaluate_rows() call is slot i; every row
0..n-1 must bring at least one token (neural-speed's rule; llama.cpp would allow gaps); each slot keeps its own
position; and empty_slots() empties them all at once (neural-speed has no way to empty one). So the batcher keeps
a table of slots, each one of:
- live: a sequence that is decoding (its row is its last token) or prefilling (its row is the next
  prefill_chunk tokens of its prompt, so a long prompt never stalls the others for more than one step);
- kept: a finished conversation's cache, untouched since: the next turn of that chat takes this slot and
  evaluates only its new tokens (prefix reuse);
- spent: given a filler token while a higher row was live, so unusable until the slots are emptied;
- fresh: empty since they were last emptied.
A new request takes the kept slot its prompt continues, else a fresh one; when nothing is live it empties the
slots first (free then), so a lone request never evaluates filler rows below its own. When no slot is fresh, the
slots are emptied and the live sequences evaluate their tokens again, in chunks, from the next step. With twice as
many slots as concurrent requests that costs one re-prefill every few requests under full load, and nothing when
the worker was idle in between.

Each next token is chosen from the row's logits exactly as alone (engine/sequence.py), so a batched greedy
answer is token for token the answer alone (tests/integration/neural_speed_cases.py, test_llama_cpp.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from workers.engine.batch_thread import BatchThread
from workers.engine.generate import Job, Result
from workers.engine.sequence import Sequence

log = logging.getLogger("slot_batcher")


class SlotModel(Protocol):
    """A model with `slots` KV caches that evaluates one row of tokens per slot in one call."""
    slots: int
    context: int             # the most tokens one slot holds
    prefill_chunk: int       # the most tokens one row may bring
    bos_id: int | None       # a token every row may carry (the filler of spent rows), when the model has one

    def evaluate_rows(self, rows: list[list[int]]) -> list[torch.Tensor]: ...

    def empty_slots(self) -> None: ...


@dataclass
class Slot:
    filled: int = 0                       # tokens in its cache (the library's position of this row)
    seq: Sequence | None = None           # live: its cache holds seq.tokens[:filled]
    feed: list[int] = field(default_factory=list)  # what the live sequence evaluates next
    kept: list[int] | None = None         # idle and untouched: the tokens its cache holds

    @property
    def fresh(self) -> bool:
        return self.seq is None and self.filled == 0


class SlotBatcher:
    """Runs the generations of one multi-slot model, batched (same interface as engine/batcher.Batcher)."""

    def __init__(self, model: SlotModel, decode: Callable[[list[int]], str],
                 postprocess: Callable[[str], str], before_step: Callable[[], None] | None = None):
        """`before_step`: called before each evaluate_rows() (cores shared by demand set the thread count there)."""
        self.model, self.decode, self.postprocess = model, decode, postprocess
        self.before_step = before_step
        self.slots = [Slot() for _ in range(model.slots)]
        self.filler = model.bos_id if model.bos_id is not None else 0  # any valid id: a spent row's output is unused
        self._work: BatchThread[Sequence] = BatchThread("ns-batcher", self._loop)
        self._waiting: list[Sequence] = []  # more requests than slots: they join as slots free up
        self.steps = 0
        self.widest = 0     # the most sequences one step has evaluated (for tests and logs)
        self.emptied = 0    # how often the slots were emptied while sequences were live (re-prefills)

    # --- the request side ------------------------------------------------------------------------

    def submit(self, job: Job, on_text: Callable[[str, int], None] | None = None) -> Result:
        """Generate for `job` in the batch; blocks until it is done (or raises what failed it)."""
        seq = Sequence.start(job, on_text, self.decode, self.postprocess)
        self._work.put(seq)
        return seq.outcome()

    @property
    def active(self) -> int:
        return sum(s.seq is not None for s in self.slots)

    @property
    def waiting(self) -> int:
        """Requests the batch thread holds that have no slot yet."""
        return len(self._waiting)

    # --- the batch thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                self._waiting += self._work.drain()
                self._place_waiting()
                if self.active:
                    self._step()
                elif not self._waiting and self._work.idle():
                    return
            except Exception as exc:  # a bug of ours: fail what is under way rather than leave it waiting
                log.exception("slot batcher failed")
                self._fail_all(exc)

    def _place_waiting(self) -> None:
        still = []
        for seq in self._waiting:
            if seq.job.cancel.is_set():
                seq.finish("cancelled")
            elif not self._place(seq):
                still.append(seq)
        self._waiting = still

    def _place(self, seq: Sequence) -> bool:
        """Give `seq` a slot (the kept conversation it continues, else a fresh one); False when all are live."""
        ids = seq.tokens
        continued = [s for s in self.slots if s.seq is None and s.kept and len(s.kept) < len(ids)
                     and ids[:len(s.kept)] == s.kept]
        slot = max(continued, key=lambda s: len(s.kept), default=None)
        if slot is None:
            if not self.active and not self.slots[0].fresh:
                self._empty_slots()  # free with nothing live; a higher slot would make every row below it a filler
            slot = next((s for s in self.slots if s.fresh), None)
            if slot is None:
                if self.active == len(self.slots):
                    return False
                self._empty_slots()
                slot = next(s for s in self.slots if s.fresh)
        seq.reused = slot.filled
        slot.seq, slot.feed, slot.kept = seq, ids[slot.filled:], None
        return True

    def _empty_slots(self) -> None:
        """Empty every slot; the live sequences move to the first ones and evaluate all their tokens again."""
        live = [s.seq for s in self.slots if s.seq is not None]
        self.model.empty_slots()
        self.slots = [Slot() for _ in self.slots]
        for slot, seq in zip(self.slots, live):
            slot.seq, slot.feed = seq, list(seq.tokens)
        if live:
            self.emptied += 1
            log.info("emptied the KV cache slots: %d live sequences evaluate their %d tokens again", len(live),
                     sum(len(s.tokens) for s in live))

    def _step(self) -> None:
        """One evaluate() for every slot up to the highest live one, then one new token per decoding sequence."""
        for slot in self.slots:
            if slot.seq is not None and slot.seq.job.cancel.is_set():
                self._leave(slot, "cancelled")
        if not self.active:
            return
        top = max(i for i, s in enumerate(self.slots) if s.seq is not None) + 1
        if any(s.seq is None and s.filled + 1 >= self.model.context for s in self.slots[:top]):
            self._empty_slots()  # a spent row would run past the context (neural-speed would then shift it)
            top = self.active
        rows = [s.feed[:self.model.prefill_chunk] if s.seq is not None else [self.filler] for s in self.slots[:top]]
        try:
            if self.before_step is not None:
                self.before_step()
            logits = self.model.evaluate_rows(rows)
        except Exception as exc:  # every sequence of the batch fails with it; the next requests start afresh
            log.exception("a batched step failed for %d rows", len(rows))
            self._fail_all(exc)
            return
        self.steps += 1
        self.widest = max(self.widest, self.active)
        for slot, row, row_logits in zip(self.slots[:top], rows, logits):
            slot.filled += len(row)
            if slot.seq is None:
                slot.kept = None  # spent
                continue
            slot.feed = slot.feed[len(row):]
            if slot.feed:
                continue  # still prefilling
            if slot.seq.emit(row_logits):
                self._leave(slot)
            else:
                slot.feed = [slot.seq.tokens[-1]]

    def _leave(self, slot: Slot, reason: str | None = None) -> None:
        seq = slot.seq
        slot.seq, slot.feed, slot.kept = None, [], seq.tokens[:slot.filled]
        seq.finish(reason)

    def _fail_all(self, exc: BaseException) -> None:
        for s in self.slots:
            if s.seq is not None:
                s.seq.error = exc
                s.seq.done.set()
                s.seq = None
        try:
            self.model.empty_slots()
        except Exception:  # the next step reports it
            log.exception("could not empty the KV cache slots")
        self.slots = [Slot() for _ in self.slots]
