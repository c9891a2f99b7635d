"""Load a model for serving on CPU with one of the bundle's backends, on the runtime that serves it.

The registry (runtimes/registry.py) picks the runtime: fp32/bf16 on transformers; itrex-int8 (ITREX weight-only
INT8) on the one `int8.runtime` names or `auto` picks, served from the quantized-weight cache (int8_cache),
quantizing first when the cache has no valid entry.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import time
from pathlib import Path

from transformers import AutoTokenizer

from workers.config.int8 import Int8Settings
from workers.engine import int8_cache
from workers.engine.runtimes import registry
from workers.engine.runtimes.base import LoadRequest, RuntimeUnavailable, UnsupportedBackend

log = logging.getLogger("loader")

__all__ = ["UnsupportedBackend", "load_model", "release_freed_memory"]


def load_model(
    source: Path,
    backend: str,
    *,
    int8: Int8Settings | None = None,
    cache_root: Path | None = None,
    trust_remote_code: bool = False,
    n_threads: int = 1,
    shared_threads: bool = False,
    concurrency: int = 1,
):
    """Return (model, tokenizer) in eval mode on CPU. `n_threads`/`shared_threads`: the worker's
    thread setting (a runtime may take its thread count at load). `concurrency`: the most generations the
    worker batches at once (a runtime may allocate per-sequence caches at load)."""
    t0 = time.monotonic()
    settings = int8 or Int8Settings()
    try:
        runtime, settings = registry.select(backend, settings, source, shared_threads)
    except RuntimeUnavailable as exc:
        raise UnsupportedBackend(str(exc)) from None
    tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    entry = None
    if runtime.quantizes:
        problem = registry.unsupported_reason(settings)
        if problem:
            raise UnsupportedBackend(problem)
        from workers.config.paths import int8_cache_dir

        try:  # done by the start before any worker runs; here for a model loaded outside a start
            runtime.prepare(settings, log.info)
        except RuntimeUnavailable as exc:
            raise UnsupportedBackend(str(exc)) from None
        entry = int8_cache.ensure(source, settings, cache_root or int8_cache_dir(), trust_remote_code)
    request = LoadRequest(source, backend, settings, cache_root, trust_remote_code, n_threads, shared_threads,
                          concurrency, entry)
    model = runtime.load(request, tokenizer)
    if hasattr(model, "eval"):
        model.eval()
    release_freed_memory()
    log.info("loaded %s with backend %s%s in %.1f s", source.name, backend,
             f" ({settings.describe()})" if runtime.quantizes else "", time.monotonic() - t0)
    return model, tokenizer


def release_freed_memory(collect: bool = True) -> None:
    """Give memory freed while loading back to the OS.

    Loading the INT8 checkpoint goes through temporary full-size tensors; glibc keeps their freed
    heap pages, which malloc_trim returns (docs/benchmarks.md).
    `collect=False` after each request: a full gc.collect() holds the GIL for a noticeable time in a serving
    worker (measured), which stalls its event loop and every generation; malloc_trim alone is cheap.
    """
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
