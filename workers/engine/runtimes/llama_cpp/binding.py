"""The few calls of llama.cpp's C API the llama.cpp runtime makes, bound with ctypes to the library inside the
pinned `xllamacpp` wheel (requirements.txt), or to the same version compiled on this host (native_build.py).

Why not llama-cpp-python: PyPI has it only as source (a 10-15 minute compile on 2 cores at every set-up), and
its ctypes structs follow a slightly different llama.cpp (its llama_context_params lacks `moe_cache_size`), so
its bindings cannot drive this library. xllamacpp is a prebuilt wheel of a current llama.cpp (CPU kernels for
AVX2/FMA/F16C, chosen for compatibility) that exports the whole C API; its own Python API is llama.cpp's HTTP
server, which samples by itself, while the bundle chooses every token from the logits (engine/sequence.py).

The structs below are llama.h's of the pinned version, field for field; `check_layout` reads the library's
defaults through them and refuses a library whose layout differs (another xllamacpp version).
"""
from __future__ import annotations

import ctypes
import logging
from ctypes import POINTER, c_bool, c_char_p, c_float, c_int, c_int8, c_int32, c_size_t, c_uint32, c_void_p
from functools import lru_cache
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

log = logging.getLogger("llama_cpp")

PACKAGE = "xllamacpp"
PINNED = "2026.10.11549"  # the version whose llama.h these structs copy (requirements.txt pins it)


class ModelParams(ctypes.Structure):
    _fields_ = [("devices", c_void_p), ("tensor_buft_overrides", c_void_p), ("n_gpu_layers", c_int32),
                ("split_mode", c_int), ("load_mode", c_int), ("lazy_mode", c_int), ("main_gpu", c_int32),
                ("tensor_split", c_void_p), ("progress_callback", c_void_p), ("progress_callback_user_data", c_void_p),
                ("kv_overrides", c_void_p), ("vocab_only", c_bool), ("check_tensors", c_bool),
                ("use_extra_bufts", c_bool), ("no_host", c_bool), ("no_alloc", c_bool), ("load_mtp", c_bool)]


class ContextParams(ctypes.Structure):
    _fields_ = [("n_ctx", c_uint32), ("n_batch", c_uint32), ("n_ubatch", c_uint32), ("n_seq_max", c_uint32),
                ("n_rs_seq", c_uint32), ("n_outputs_max", c_uint32), ("n_outputs_max_per_seq", c_uint32),
                ("n_threads", c_int32), ("n_threads_batch", c_int32),
                ("ctx_type", c_int), ("rope_scaling_type", c_int), ("pooling_type", c_int), ("attention_type", c_int),
                ("flash_attn_type", c_int),
                ("rope_freq_base", c_float), ("rope_freq_scale", c_float), ("yarn_ext_factor", c_float),
                ("yarn_attn_factor", c_float), ("yarn_beta_fast", c_float), ("yarn_beta_slow", c_float),
                ("yarn_orig_ctx", c_uint32), ("defrag_thold", c_float),
                ("cb_eval", c_void_p), ("cb_eval_user_data", c_void_p), ("type_k", c_int), ("type_v", c_int),
                ("moe_cache_size", c_size_t), ("abort_callback", c_void_p), ("abort_callback_data", c_void_p),
                ("embeddings", c_bool), ("offload_kqv", c_bool), ("no_perf", c_bool), ("op_offload", c_bool),
                ("swa_full", c_bool), ("kv_unified", c_bool),
                ("samplers", c_void_p), ("n_samplers", c_size_t), ("ctx_other", c_void_p)]


class Batch(ctypes.Structure):
    _fields_ = [("n_tokens", c_int32), ("token", POINTER(c_int32)), ("embd", POINTER(c_float)),
                ("pos", POINTER(c_int32)), ("n_seq_id", POINTER(c_int32)), ("seq_id", POINTER(POINTER(c_int32))),
                ("logits", POINTER(c_int8))]


LOG_CALLBACK = ctypes.CFUNCTYPE(None, c_int, c_char_p, c_void_p)
LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level WARN, ERROR; its INFO/DEBUG are dropped


@LOG_CALLBACK
def _log_to_python(level, text, _user):
    if level in LOG_LEVELS and text:
        log.log(LOG_LEVELS[level], "%s", text.decode("utf-8", "replace").rstrip())


_SIGNATURES = {
    "llama_backend_init": ([], None),
    "llama_log_set": ([LOG_CALLBACK, c_void_p], None),
    "llama_model_default_params": ([], ModelParams),
    "llama_context_default_params": ([], ContextParams),
    "llama_model_load_from_file": ([c_char_p, ModelParams], c_void_p),
    "llama_model_free": ([c_void_p], None),
    "llama_init_from_model": ([c_void_p, ContextParams], c_void_p),
    "llama_free": ([c_void_p], None),
    "llama_model_get_vocab": ([c_void_p], c_void_p),
    "llama_vocab_n_tokens": ([c_void_p], c_int32),
    "llama_batch_init": ([c_int32, c_int32, c_int32], Batch),
    "llama_batch_free": ([Batch], None),
    "llama_decode": ([c_void_p, Batch], c_int32),
    "llama_get_logits_ith": ([c_void_p, c_int32], POINTER(c_float)),
    "llama_get_memory": ([c_void_p], c_void_p),
    "llama_memory_clear": ([c_void_p, c_bool], None),
    "llama_set_n_threads": ([c_void_p, c_int32, c_int32], None),
}


def unavailable_reason() -> str | None:
    """Why this environment cannot load the library, or None."""
    if find_spec(PACKAGE) is None:
        return f"the {PACKAGE} package is not installed (scripts/setup.sh installs it)"
    if version(PACKAGE) != PINNED:
        return f"{PACKAGE} {version(PACKAGE)} is installed, and the bundle binds the C API of {PINNED}"
    return None


def library_path() -> Path:
    spec = find_spec(PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob(f"{PACKAGE}*.so"))
    if not found:
        raise FileNotFoundError(f"no {PACKAGE} shared library in {folder}")
    return found[0]


@lru_cache(maxsize=None)
def library(path: Path | None = None) -> ctypes.CDLL:
    """The library at `path` (one compiled for this CPU from the pinned version's source: native_build.py) or the
    wheel's, its calls typed, its log sent to Python's (warnings and errors), its backend initialised."""
    if path is None:
        problem = unavailable_reason()
        if problem:
            raise RuntimeError(problem)
    lib = ctypes.CDLL(str(path or library_path()))
    for name, (args, result) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    lib.llama_log_set(_log_to_python, None)
    lib.llama_backend_init()
    check_layout(lib)
    return lib


# llama.h's documented defaults (llama_context_default_params, llama_model_default_params), spread over both structs
CONTEXT_DEFAULTS = [("n_ctx", 512), ("n_batch", 2048), ("n_ubatch", 512), ("n_seq_max", 1), ("n_rs_seq", 0),
                    ("n_outputs_max", 0), ("n_outputs_max_per_seq", 1), ("ctx_type", 0), ("rope_scaling_type", -1),
                    ("yarn_ext_factor", -1.0), ("yarn_orig_ctx", 0), ("defrag_thold", -1.0), ("cb_eval", None),
                    ("type_k", 1), ("type_v", 1), ("moe_cache_size", 0), ("abort_callback", None),
                    ("embeddings", False), ("offload_kqv", True), ("no_perf", True), ("op_offload", True),
                    ("swa_full", True), ("kv_unified", False), ("samplers", None), ("n_samplers", 0),
                    ("ctx_other", None)]
MODEL_DEFAULTS = [("devices", None), ("n_gpu_layers", -1), ("split_mode", 1), ("load_mode", -1), ("lazy_mode", 1),
                  ("main_gpu", 0), ("kv_overrides", None), ("vocab_only", False), ("check_tensors", False),
                  ("use_extra_bufts", True), ("no_host", False), ("no_alloc", False), ("load_mtp", False)]


def check_layout(lib) -> None:
    """Refuse a library whose structs are not the ones above: its documented defaults must read back as such."""
    ctx = lib.llama_context_default_params()
    model = lib.llama_model_default_params()
    seen = {name: getattr(ctx, name) for name, _ in CONTEXT_DEFAULTS}
    seen.update({name: getattr(model, name) for name, _ in MODEL_DEFAULTS})
    expected = dict(CONTEXT_DEFAULTS + MODEL_DEFAULTS)
    wrong = {k: v for k, v in seen.items() if v != expected[k]}
    if wrong:
        raise RuntimeError(f"{PACKAGE}'s llama.cpp structs differ from the ones bound here (defaults read as "
                           f"{wrong}, expected {({k: expected[k] for k in wrong})}); install {PACKAGE}=={PINNED}")
