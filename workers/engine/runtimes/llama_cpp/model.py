"""A model served by llama.cpp: a GGUF file of the INT8 cache loaded with one KV cache slot per concurrent sequence
(a llama.cpp sequence id each), driven one decode call per step by the bundle's slot batcher
(engine/slot_batcher.py), which chooses every token from the logits exactly as for the other runtimes.
"""
from __future__ import annotations

import atexit
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from workers.engine.runtimes.llama_cpp import binding
from workers.models.memory_budget import kv_bytes_per_token

log = logging.getLogger("llama_cpp")

# llama.cpp allocates its whole f16 KV cache at load: SLOTS_KV_BYTES for all slots of a worker (layout).
MAX_SLOTS = 8
SLOTS_KV_BYTES = 4 * 2**30
MIN_SLOT_CONTEXT = 4096
PREFILL_CHUNK = 256  # the most prompt tokens one row brings per step, so a long prompt never stalls the others long


def f16_kv_per_token(config: dict) -> int:
    return kv_bytes_per_token(config) // 2


def layout(config: dict, context: int, concurrency: int) -> tuple[int, int]:
    """(slots, tokens each slot holds) for a worker of this config.json batching `concurrency` generations, within
    SLOTS_KV_BYTES: twice the concurrency in slots (a finished conversation keeps its slot for its next turn; the
    batcher empties slots all at once), at most MAX_SLOTS, each holding the model's whole context; else as few as
    the concurrency, each holding what the bound leaves (a served context below the model's: a 128 K Llama 3.1 gets
    32 K alone); else fewer slots, each holding at least MIN_SLOT_CONTEXT tokens (beyond the bound for one slot)."""
    per_token = max(1, f16_kv_per_token(config))
    fits = SLOTS_KV_BYTES // per_token  # tokens of all slots together
    want = min(MAX_SLOTS, 2 * concurrency) if concurrency > 1 else 1
    least = min(want, max(1, concurrency))
    for slots in range(want, least - 1, -1):
        if slots * context <= fits:
            return slots, context
    floor = min(context, MIN_SLOT_CONTEXT)
    slots = least
    while slots > 1 and fits // slots < floor:
        slots -= 1
    return slots, min(context, max(floor, fits // slots))


def kv_bytes(config: dict, context: int, concurrency: int) -> int:
    """The KV cache llama.cpp allocates at load for this worker."""
    slots, slot_context = layout(config, context, concurrency)
    return slots * slot_context * f16_kv_per_token(config)


class LlamaCppModel:
    """One GGUF file loaded with a fixed thread count, a context of `context` tokens per slot and `slots` slots.
    `config`: the model's transformers config (what the serving side reads of the model). Freed by close(), which
    also runs at exit: a process that generated from a thread and exited without freeing the context aborted
    ("terminate called without an active exception"); a finalizer would run too late, after the library is gone."""

    prefill_chunk = PREFILL_CHUNK
    bos_id = None  # any token fills a spent row: llama.cpp asks nothing of a sequence's first token

    def __init__(self, gguf: Path, config, n_threads: int, context: int, slots: int, library: Path | None = None):
        self.gguf, self.config, self.n_threads, self.context, self.slots = gguf, config, n_threads, context, slots
        self.weight_type = gguf.stem.rsplit("-", 1)[-1].upper()  # model-q8_0.gguf: Q8_0
        self._lib = lib = binding.library(library)  # None: the wheel's
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self._model = lib.llama_model_load_from_file(str(gguf).encode(), params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {gguf} (its log lines above say why)")
        ctx = lib.llama_context_default_params()
        ctx.n_ctx, ctx.n_seq_max = context * slots, slots   # not unified: each sequence gets n_ctx / n_seq_max
        ctx.n_batch = slots * PREFILL_CHUNK                  # one step: every row's tokens in one decode call
        ctx.n_ubatch = min(ctx.n_batch, 512)
        ctx.n_threads = ctx.n_threads_batch = n_threads
        ctx.n_outputs_max_per_seq = 0  # as many as a batch holds: all_logits asks for every position
        self._ctx = lib.llama_init_from_model(self._model, ctx)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not make a context of {slots} x {context} tokens for {gguf.name}")
        self.vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model))
        self._batch = lib.llama_batch_init(ctx.n_batch, 0, 1)
        self._filled = [0] * slots  # tokens in each slot's cache
        self._lock = threading.Lock()  # a call into the context, or close()
        atexit.register(self.close)

    def set_threads(self, n: int) -> None:
        """The thread count of the next decode calls (cores shared by demand change it between steps)."""
        with self._lock:
            if n != self.n_threads and self._ctx:
                self._lib.llama_set_n_threads(self._ctx, n, n)
                self.n_threads = n

    def evaluate_rows(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """One decode call: row i's tokens continue slot i; the logits (1, vocab) after each row's last token."""
        with self._lock:
            return self._evaluate_rows(rows)

    def _evaluate_rows(self, rows: list[list[int]]) -> list[torch.Tensor]:
        if not self._ctx:
            raise RuntimeError(f"the llama.cpp model {self.gguf.name} is closed")
        batch, n = self._batch, 0
        last = []
        for seq, row in enumerate(rows):
            for j, token in enumerate(row):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, self._filled[seq] + j, 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = j == len(row) - 1
                n += 1
            last.append(n - 1)
        batch.n_tokens = n
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            self._clear()  # its memory may hold part of the batch: the batcher starts every slot afresh
            raise RuntimeError(f"llama.cpp's decode returned {status} for {len(rows)} rows of {n} tokens")
        for seq, row in enumerate(rows):
            self._filled[seq] += len(row)
        return [self._logits(i) for i in last]

    def _logits(self, i: int) -> torch.Tensor:
        ptr = self._lib.llama_get_logits_ith(self._ctx, i)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.vocab,)).copy())[None]

    def all_logits(self, ids: list[int]) -> torch.Tensor:
        """Logits (len(ids), vocab) of every position, from an empty cache (perplexity); empties the slots after."""
        step = self.slots * PREFILL_CHUNK
        if len(ids) > self.context:
            raise ValueError(f"{len(ids)} tokens do not fit one slot's context of {self.context}")
        with self._lock:
            return self._all_logits(ids, step)

    def _all_logits(self, ids: list[int], step: int) -> torch.Tensor:
        self._clear()
        batch, rows = self._batch, []
        try:
            for start in range(0, len(ids), step):
                chunk = ids[start:start + step]
                for j, token in enumerate(chunk):
                    batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = token, start + j, 1, True
                    batch.seq_id[j][0] = 0
                batch.n_tokens = len(chunk)
                status = self._lib.llama_decode(self._ctx, batch)
                if status != 0:
                    raise RuntimeError(f"llama.cpp's decode returned {status} for {len(chunk)} tokens")
                rows.extend(self._logits(j) for j in range(len(chunk)))
        finally:
            self._clear()
        return torch.cat(rows)

    def empty_slots(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), False)  # cells only: unused data is masked
        self._filled = [0] * self.slots

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                self._lib.llama_batch_free(self._batch)
                self._lib.llama_free(self._ctx)
                self._lib.llama_model_free(self._model)
                self._ctx = self._model = None
