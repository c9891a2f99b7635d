"""A model served by neural-speed (ITREX's own CPU runtime), and the runner that generates with it.

neural-speed keeps one sequence's KV cache inside the library; the bundle drives it one forward
pass at a time (`evaluate`) and does everything else itself, exactly as for transformers models:
the prompt bytes come from the model's own chat format, each next token is chosen by the same
logits processors generate() uses (engine/sequence.py), stop tokens and strings, streaming and
cancellation between steps are the bundle's. neural-speed's own generate() is not used: it stops
only at its eos id and cannot be cancelled.

Prefix reuse: the cache holds the last conversation; a prompt that continues it (the next turn of
a chat) evaluates only its new tokens. Anything else starts the cache afresh.

A graph that batches (family data `continuous_batching`) is loaded with several KV cache slots, and its
concurrent requests decode together (engine/slot_batcher.py); otherwise they run one at a time (SerialRunner).
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from workers.engine.generate import Job, Result
from workers.engine.prompt import context_length
from workers.engine.sequence import Sequence
from workers.models.memory_budget import kv_bytes_per_token
from workers.models.families import neural_speed_graph

log = logging.getLogger("ns_model")


def scratch_ratio(context: int) -> float:
    """neural-speed's own scratch-buffer scale for a context length (its Model.init_from_bin rule)."""
    return 1 if context <= 2048 else 2 if context <= 4096 else 4 if context <= 8192 else 8


# Batch slots. neural-speed sizes each scratch buffer as slots x scratch ratio x a per-graph base, one malloc each,
# so a few long-context slots already exhaust a 24 GiB machine. A batched model keeps slots x ratio at SCRATCH_UNITS,
# what one 8192-token slot takes alone, and evaluates at most PREFILL_CHUNK tokens per row per call, which that
# smaller scratch holds (the figures: docs/benchmarks.md, 'Figures behind constants in the code').
SCRATCH_UNITS = 4
MAX_SLOTS = 8
PREFILL_CHUNK = 256
# Each slot's KV cache holds a whole context (f16, slot_bytes): the slots of one worker may hold at
# most this much, enough for several small-model slots and two of a 7 B model (docs/benchmarks.md).
SLOTS_KV_BYTES = 4 * 2**30


def slot_bytes(config: dict, context: int) -> int:
    """One neural-speed KV cache slot: a whole context in f16 (its 'kv self size', measured), allocated at
    load and resident as it fills. Identity layers (at most 1/8 more under int8.runtime auto) not counted."""
    return kv_bytes_per_token(config) // 2 * context


def batch_slots(graph, concurrency: int, slot_bytes: int) -> int:
    """KV cache slots for a model serving up to `concurrency` generations at once: twice as many as that (a finished
    conversation's slot stays reusable for its next turn, and slots are only emptied all at once), at most
    MAX_SLOTS and SLOTS_KV_BYTES, when the graph batches and at least 2 fit; else 1."""
    if graph is None or not graph.continuous_batching or concurrency < 2:
        return 1
    slots = min(MAX_SLOTS, 2 * concurrency, SLOTS_KV_BYTES // max(1, slot_bytes))
    return slots if slots >= 2 else 1


def slots_for(config: dict, concurrency: int) -> int:
    """The KV cache slots a neural-speed worker of this config.json batching `concurrency` generations loads with."""
    context = context_length(config)
    return batch_slots(neural_speed_graph(config)[0], concurrency, slot_bytes(config, context))


class NeuralSpeedModel:
    """The INT8 graph of one cache entry, loaded with a fixed thread count, context length and number of KV
    cache slots (`slots` > 1: concurrent sequences, each in its own slot; see batch_slots)."""

    def __init__(self, entry: Path, config, n_threads: int, context: int, concurrency: int = 1):
        from workers.engine.runtimes.neural_speed.quantize import GRAPH_INFO

        self.config, self.entry, self.n_threads, self.context = config, entry, n_threads, context
        self.prefill_chunk = PREFILL_CHUNK
        self.info = json.loads((entry / GRAPH_INFO).read_text())
        # Its llama graph refuses (and evaluates nothing for) a sequence whose first token is not the
        # BOS id in the file header, which is config.json's bos_token_id (family data: bos_first).
        self.graph, _ = neural_speed_graph(config)
        self.bos_id = getattr(config, "bos_token_id", None) if self.graph.bos_first else None
        self.slots = slots_for(config.to_dict(), concurrency)
        self.bits = self.info["settings"].get("bits", 8)  # the weights' bits (int8.bits)
        self._load()

    def _load(self) -> None:
        from neural_speed import Model

        from workers.engine.runtimes.neural_speed.quantize import WEIGHTS

        if self.slots > 1:
            layout = {"max_request_num": self.slots, "scratch_size_ratio": SCRATCH_UNITS / self.slots}
        else:
            layout = {"scratch_size_ratio": scratch_ratio(self.context)}
        self._model = Model()
        self._model.init_from_bin(self.info["module"], str(self.entry / WEIGHTS), threads=self.n_threads,
                                  ctx_size=self.context, **layout)
        self.state: list[int] = []  # the tokens the library's cache holds (one slot)

    def evaluable(self, ids: list[int]) -> list[int]:
        """The tokens to evaluate for a prompt: `ids`, after the BOS id when the graph needs it first. Its llama
        graph checks that a sequence's first token is the file header's BOS id (llama.cpp's model_eval_internal
        in neural-speed 1.0, `first token must be BOS`) and evaluates nothing otherwise; nothing else in the graph
        depends on it, but no call can write cache position 0 without passing that check. Chat prompts start
        with it; a plain completion prompt of a model whose tokenizer adds no BOS (SmolLM2) is answered after it."""
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            return [self.bos_id] + list(ids)
        return list(ids)

    def _evaluate(self, ids: list[int], logits_all: bool = False) -> np.ndarray:
        try:
            out = self._model.model.evaluate([ids], logits_all)
            logits = np.asarray(out[0]) if len(out) else np.empty((0, 0))
            if logits.shape[0] != (len(ids) if logits_all else 1):
                raise RuntimeError(f"neural-speed evaluated nothing for {len(ids)} tokens (see its log line above)")
            return logits
        except BaseException:
            self.state = []  # unknown after a failure: the next prompt starts afresh
            raise

    def prefill(self, ids: list[int]) -> tuple[torch.Tensor, int]:
        """Logits (1, vocab) after `ids`, and how many of them the cache already held."""
        held = len(self.state)
        if 0 < held < len(ids) and ids[:held] == self.state:
            reused, new = held, ids[held:]
        else:
            self._model.model.reinit()
            reused, new = 0, ids
        self.state = []
        logits = self._evaluate(new)
        self.state = list(ids)
        return torch.from_numpy(logits[-1:].copy()), reused

    def step(self, token: int) -> torch.Tensor:
        logits = self._evaluate([token])
        self.state.append(token)
        return torch.from_numpy(logits[-1:].copy())

    def evaluate_rows(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """One call for slots 0..len(rows)-1, each row's tokens after what its slot holds (at most PREFILL_CHUNK);
        the last logits (1, vocab) of each row. A multi-slot model only: the caller keeps each slot's state."""
        out = self._model.model.evaluate(rows, False)
        if len(out) != len(rows) or any(np.asarray(o).shape[0] != 1 for o in out):
            raise RuntimeError(f"neural-speed evaluated nothing for a batch of {len(rows)} rows (see its log line above)")
        return [torch.from_numpy(np.array(o[-1:], copy=True)) for o in out]

    def empty_slots(self) -> None:
        """Empty every slot's cache (the library has no way to empty one)."""
        self._model.model.reinit()
        self.state = []

    def all_logits(self, ids: list[int]) -> torch.Tensor:
        """Logits (len(ids), vocab) of every position, from a fresh cache (perplexity); ids start with BOS.

        Measured with neural-speed 1.0: after one evaluation with all logits, the library's later
        last-token evaluations are wrong (also after reinit), so the graph is loaded afresh after it."""
        if not self.graph.all_logits:
            raise ValueError(f"neural-speed's {self.graph.module} graph gives only the last position's logits")
        if self.slots > 1:  # its scratch holds PREFILL_CHUNK tokens a row, not a whole text
            raise ValueError("all logits need a model loaded with one slot (concurrency 1)")
        self._model.model.reinit()
        self.state = []
        try:
            return torch.from_numpy(self._evaluate(ids, logits_all=True).copy())
        finally:
            self._load()


class SerialRunner:
    """Runs a neural-speed model's generations one at a time: the library holds one sequence's cache,
    so concurrent requests queue here (each leaves the queue at once when cancelled)."""

    def __init__(self, model: NeuralSpeedModel, decode, postprocess):
        self.model, self.decode, self.postprocess = model, decode, postprocess
        self._lock = threading.Lock()

    def submit(self, job: Job, on_text=None) -> Result:
        seq = Sequence.start(job, on_text, self.decode, self.postprocess)
        while not self._lock.acquire(timeout=0.1):
            if job.cancel.is_set():
                seq.finish("cancelled")
                return seq.outcome()
        try:
            if job.cancel.is_set():
                seq.finish("cancelled")
                return seq.outcome()
            logits, seq.reused = self.model.prefill(seq.tokens)
            while not seq.emit(logits):
                logits = self.model.step(seq.tokens[-1])
            seq.finish()
        finally:
            self._lock.release()
        return seq.outcome()
