"""Load a model for serving on CPU with one of the bundle's backends.

- itrex-int8: ITREX weight-only INT8, served from the quantized-weight cache (int8_cache), quantizing
  first when the cache has no valid entry. Runtime (int8_runtime): neural-speed (its own graph,
  ns_model.NeuralSpeedModel) or qbits (RtnConfig, qbits kernels under the transformers model).
- fp32 / bf16: plain transformers baselines in exactly that precision: every floating parameter is
  float32 (bfloat16), whatever the family's code would pick (ChatGLM3 builds its layers in
  config.torch_dtype, float16 as shipped; Qwen-7B picks from its fp32/bf16/fp16 flags); the family's
  config overrides (families.py) say how, and any parameter still in another dtype is cast.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.engine import int8_cache, int8_runtime, threads
from workers.config.int8 import Int8Settings, unsupported_reason
from workers.models.families import prepare_cpu_config

log = logging.getLogger("loader")

BACKENDS = ("itrex-int8", "fp32", "bf16")


class UnsupportedBackend(ValueError):
    pass


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
    thread setting (neural-speed takes its thread count at load). `concurrency`: the most generations the
    worker batches at once (neural-speed allocates a KV cache slot per sequence at load)."""
    if backend not in BACKENDS:
        raise UnsupportedBackend(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    if backend == "itrex-int8":
        # Loading repacks the INT8 weights with qbits kernels: with a thread team that differs from
        # qbits' count, part of every matrix is left unpacked (a garbage model from then on).
        threads.align_this_thread()
        model = _load_int8(source, int8 or Int8Settings(), cache_root, trust_remote_code, n_threads, shared_threads,
                           concurrency)
    else:
        dtype = torch.float32 if backend == "fp32" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(
            str(source),
            config=prepare_cpu_config(source, trust_remote_code, dtype),
            torch_dtype=dtype,
            low_cpu_mem_usage=True,
            trust_remote_code=trust_remote_code,
        )
        cast_parameters(model, dtype)
    if hasattr(model, "eval"):
        model.eval()
    release_freed_memory()
    log.info("loaded %s with backend %s in %.1f s", source.name, backend, time.monotonic() - t0)
    return model, tokenizer


def cast_parameters(model, dtype: torch.dtype) -> int:
    """Cast every floating parameter not in `dtype` to it (buffers stay: rotary tables are float32 by
    design); returns how many were cast. A family whose config overrides work casts none."""
    wrong = [(name, p) for name, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype]
    if wrong:
        log.warning("%d parameters were not %s after loading (e.g. %s is %s); casting them",
                    len(wrong), dtype, wrong[0][0], wrong[0][1].dtype)
        with torch.no_grad():
            for _, p in wrong:
                p.data = p.data.to(dtype)
    return len(wrong)


def release_freed_memory(collect: bool = True) -> None:
    """Give memory freed while loading back to the OS.

    Loading the INT8 checkpoint goes through temporary full-size tensors; glibc keeps their freed
    heap pages. Measured on the 1.1 B model: steady RSS 3.20 -> 2.58 GiB after malloc_trim.
    `collect=False` after each request: a full gc.collect() holds the GIL for 0.2-0.3 s in a serving
    worker (measured), which stalls its event loop and every generation; malloc_trim alone takes ~7 ms.
    """
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _load_int8(source: Path, settings: Int8Settings, cache_root: Path | None, trust_remote_code: bool,
               n_threads: int, shared_threads: bool, concurrency: int):
    try:
        settings = int8_runtime.resolve(settings, source, shared_threads)
    except int8_runtime.RuntimeUnavailable as exc:
        raise UnsupportedBackend(str(exc)) from None
    problem = unsupported_reason(settings)
    if problem:
        raise UnsupportedBackend(problem)
    from workers.config.paths import int8_cache_dir

    entry = int8_cache.ensure(source, settings, cache_root or int8_cache_dir(), trust_remote_code)
    if settings.runtime == "neural-speed":
        from transformers import AutoConfig

        from workers.engine.ns_model import NeuralSpeedModel
        from workers.engine.prompt import context_length

        config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
        model = NeuralSpeedModel(entry, config, n_threads, context_length(config), concurrency)
        log.info("INT8 runtime neural-speed: %d threads, context %d, %d KV cache slot(s)", n_threads,
                 context_length(config), model.slots)
        return model
    from workers.engine.qbits_load import load_saved

    return load_saved(entry, trust_remote_code)
