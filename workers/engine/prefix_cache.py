"""Reuse the KV cache of recent conversations: a new prompt that starts like an earlier prompt plus
its answer (the next turn of a chat) is processed only from where it differs, so the time to the
first token follows the new message, not the whole history.

Entries are the model's own past_key_values (a tuple per layer of key/value tensors, in whatever
layout the family's code uses: Llama (batch, heads, seq, dim), Qwen (batch, seq, heads, dim),
ChatGLM3 (seq, batch, groups, dim)). The sequence axis of each tensor is found by its length, so no
per-family layout is declared. Total cached tokens are bounded (`models[].prefix_cache_tokens`);
the least recently used entry goes first.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

MIN_REUSE_TOKENS = 8  # below this, reuse saves nothing worth the bookkeeping


@dataclass
class Prefix:
    """A cache covering `ids` (the tokens already processed) and where each tensor's sequence axis is."""

    ids: tuple[int, ...]
    past: tuple
    axes: tuple


def sequence_axes(past, length: int):
    """For each layer's tensors, the axis whose size is `length`; None when it is ambiguous."""
    axes = []
    for layer in past:
        layer_axes = []
        for t in layer:
            if not isinstance(t, torch.Tensor):
                return None
            matches = [d for d, size in enumerate(t.shape) if size == length]
            if len(matches) != 1:
                return None
            layer_axes.append(matches[0])
        axes.append(tuple(layer_axes))
    return tuple(axes)


def crop(prefix: Prefix, length: int) -> tuple:
    """The cache of the first `length` tokens (new tensors: the entry itself stays intact)."""
    return tuple(
        tuple(t.narrow(axis, 0, length).clone() for t, axis in zip(layer, layer_axes))
        for layer, layer_axes in zip(prefix.past, prefix.axes)
    )


def legacy(past):
    """past_key_values as a plain tuple of tuples (transformers' own models may return a Cache object)."""
    to_legacy = getattr(past, "to_legacy_cache", None)
    return to_legacy() if to_legacy is not None else past


def takes_cache_objects(model) -> bool:
    """Whether `model` needs past_key_values as a transformers Cache object: transformers' own model classes
    from transformers 4.50 on (4.40's take tuples as well; remote code such as ChatGLM3's takes tuples only)."""
    import transformers

    own = type(model).__module__.startswith("transformers.")
    return own and tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (4, 50)


def model_cache(model, past):
    """`past` (a tuple per layer, or None) as `model` takes it. For a model that takes Cache objects: a
    DynamicCache built without the model's config, so every layer keeps its whole sequence (with its config,
    sliding-window layers would keep only their window, and layers would differ in length, which the
    batcher's padding and cutting and the prefix cache do not expect; the attention mask still applies
    the window)."""
    if not takes_cache_objects(model):
        return past
    from transformers import DynamicCache

    if past is None:
        return DynamicCache()
    return past if isinstance(past, DynamicCache) else DynamicCache.from_legacy_cache(legacy(past))


def common_length(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], Prefix] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def tokens(self) -> int:
        return sum(len(k) for k in self._entries)

    def longest(self, prompt: list[int]) -> tuple[Prefix | None, int]:
        """The entry sharing the longest prefix with `prompt`, and how many tokens it can give.

        At least one prompt token is always left to process: generate() needs it for the logits.
        """
        best, best_len = None, 0
        with self._lock:
            for key, entry in self._entries.items():
                n = min(common_length(key, prompt), len(prompt) - 1)
                if n > best_len:
                    best, best_len = entry, n
            if best is not None and best_len >= MIN_REUSE_TOKENS:
                self._entries.move_to_end(best.ids)
                self.hits += 1
                return best, best_len
            self.misses += 1
            return None, 0

    def store(self, ids: list[int], past) -> bool:
        """Keep the cache of `ids`; False when it cannot be kept (too long, unknown layout)."""
        if self.max_tokens <= 0 or len(ids) < MIN_REUSE_TOKENS or len(ids) > self.max_tokens:
            return False
        past = legacy(past)
        axes = sequence_axes(past, len(ids))
        if axes is None:
            return False
        key = tuple(ids)
        with self._lock:
            # An entry that is a prefix of the new one is superseded by it.
            for old in [k for k in self._entries if common_length(k, key) == len(k)]:
                del self._entries[old]
            self._entries[key] = Prefix(key, past, axes)
            while self.tokens > self.max_tokens:
                self._entries.popitem(last=False)
        return True
