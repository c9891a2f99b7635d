"""The llama.cpp runtime's choices (engine/runtimes/llama_cpp): only where named, what it refuses and why, its KV
cache slots and what the memory check counts, and the ctypes binding's check of the library's struct layout."""
from __future__ import annotations

import json

import pytest

from workers.config import deployment
from workers.config.int8 import Int8Settings
from workers.engine.runtimes import registry
from workers.engine.runtimes.llama_cpp import binding
from workers.engine.runtimes.llama_cpp.model import MAX_SLOTS, SLOTS_KV_BYTES, f16_kv_per_token, kv_bytes, layout
from workers.ops import cli

GIB = 2**30
LLAMA_CPP = Int8Settings(runtime="llama-cpp")
LLAMA_2_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
              "num_hidden_layers": 32, "max_position_embeddings": 4096}
LLAMA_3_8B = {**LLAMA_2_7B, "num_key_value_heads": 8, "max_position_embeddings": 8192}
LLAMA_3_1_8B = {**LLAMA_3_8B, "max_position_embeddings": 131072}
AVX2 = frozenset({"avx", "avx2", "fma", "f16c"})


def test_auto_never_picks_it_and_naming_it_gives_it(embedded_model):
    assert registry.resolve_runtime(Int8Settings(), embedded_model).runtime != "llama-cpp"
    runtime, settings = registry.select("itrex-int8", LLAMA_CPP, embedded_model)
    assert runtime.name == "llama-cpp" and settings.runtime == "llama-cpp"
    assert settings.group_size == 32 and "groups of 32" in settings.describe()  # Q8_0's blocks, whatever is asked
    assert registry.resolve(LLAMA_CPP.model_copy(update={"group_size": 128}), embedded_model).group_size == 32


def test_it_takes_int4_refuses_cpus_without_avx2_and_follows_shared_cores(embedded_model):
    assert registry.resolve_runtime(LLAMA_CPP, embedded_model, shared_threads=True).runtime == "llama-cpp"
    assert registry.unsupported_reason(LLAMA_CPP, AVX2) is None
    assert "lacks AVX2, FMA" in registry.unsupported_reason(LLAMA_CPP, frozenset({"avx", "f16c"}))
    assert registry.unsupported_reason(LLAMA_CPP.model_copy(update={"bits": 4}), AVX2) is None
    assert registry.resolve(LLAMA_CPP.model_copy(update={"bits": 4, "group_size": 128}), embedded_model).group_size == 32


def test_slots_and_their_context_stay_within_the_kv_bound():
    """Twice the concurrency in slots of the model's whole context; else as many as the concurrency, holding what the
    bound leaves; else fewer, of at least 4096 tokens (f16 K and V per token: Llama-2-7B 512 KiB, Llama-3-8B 128 KiB)."""
    small = {**LLAMA_2_7B, "hidden_size": 256, "num_hidden_layers": 2}
    assert [layout(small, 2048, n) for n in (1, 2, 4, 16)] == [(1, 2048), (4, 2048), (8, 2048), (MAX_SLOTS, 2048)]
    assert layout(LLAMA_3_8B, 8192, 4) == (4, 8192)
    assert layout(LLAMA_2_7B, 4096, 4) == (2, 4096)
    assert layout(LLAMA_3_1_8B, 131072, 1) == (1, 32768)  # alone: what 4 GiB holds, not 16 GiB for 128 K tokens
    assert layout(LLAMA_3_1_8B, 131072, 4) == (4, 8192)
    for config in (LLAMA_2_7B, LLAMA_3_8B, LLAMA_3_1_8B):
        for n in (1, 2, 4):
            assert kv_bytes(config, config["max_position_embeddings"], n) <= SLOTS_KV_BYTES
    huge = {**LLAMA_2_7B, "num_hidden_layers": 80, "max_position_embeddings": 8192}  # 1.25 MiB per token
    assert layout(huge, 8192, 4) == (1, 4096)  # at least 4096 tokens, beyond the bound if need be


def test_the_memory_check_counts_its_slots(embedded_model):
    int8 = deployment.load("default", cpu_count=2).models[0]
    named = int8.model_copy(update={"int8": LLAMA_CPP})
    config = json.loads((embedded_model / "config.json").read_text())
    assert cli.runtime_kv_bytes(named) == 8 * 8192 * f16_kv_per_token(config)  # limit_concurrency 4: 8 slots
    assert cli.runtime_kv_bytes(named.model_copy(update={"batching": False})) == 8192 * f16_kv_per_token(config)


def test_the_binding_reads_the_installed_librarys_defaults_through_its_structs():
    lib = binding.library()  # check_layout passed, or this raised
    ctx = lib.llama_context_default_params()
    assert (ctx.n_ctx, ctx.n_batch, ctx.kv_unified, ctx.ctx_other) == (512, 2048, False, None)


def test_the_binding_refuses_a_library_whose_struct_layout_differs():
    lib = binding.library()

    class Shifted:  # another llama.cpp: one field more before n_ctx moves every later one
        def llama_context_default_params(self):
            params = lib.llama_context_default_params()
            params.n_ctx, params.n_batch = params.n_batch, params.n_ubatch
            return params

        llama_model_default_params = staticmethod(lib.llama_model_default_params)

    with pytest.raises(RuntimeError, match=r"structs differ .*'n_ctx': 2048"):
        binding.check_layout(Shifted())
