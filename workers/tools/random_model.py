"""Random-weight Llama checkpoints for the benchmarks: speed and memory do not depend on the weights.

Built once under var/bench/<name>, with the embedded model's tokenizer (so prompts tokenize the same
way), seeded so every build of a shape has the same weights.
"""
from __future__ import annotations

from pathlib import Path

from workers.config.paths import var_dir

# Llama configs whose linear layers and embeddings have the real models' sizes (their parameter
# counts match the real models', docs/benchmarks.md): Qwen's fused c_attn is q+k+v here, ChatGLM3's
# multi-query attention with 2 groups is 2 KV heads.
SHAPES = {
    "qwen-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=151936),
    "chatglm3-6b": dict(hidden_size=4096, intermediate_size=13696, num_hidden_layers=28,
                        num_attention_heads=32, num_key_value_heads=2, vocab_size=65024),
    # today's 8 B Llama (Llama 3.1's rope scaling does not change the speed)
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    # today's 8 B Qwen (Qwen3's per-head q/k norms are too small to change the speed)
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=151936),
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}
# TinyLlama (1.1 B parameters) with the embedded tokenizer's vocabulary: bench_engine's model.
TINYLLAMA_EMBEDDED_VOCAB = dict(SHAPES["llama-1.1b"], vocab_size=49152, max_position_embeddings=2048)
# The same at 32 layers (1.5 B): neural-speed 1.0's llama graph knows 32 layers, so it runs this one
# unpadded, as it runs Llama 2/3 7 B and Qwen-7B; the 22-layer one it runs as 32 (10 identity layers).
TINYLLAMA_32_LAYERS = dict(TINYLLAMA_EMBEDDED_VOCAB, num_hidden_layers=32)
# A Llama small enough to quantize in seconds, with the embedded tokenizer's vocabulary (the tests' cache cases).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=49152, max_position_embeddings=2048)


def random_llama(name: str, shape: dict, dtype: str = "float32", max_shard_size: str = "5GB",
                 root: Path | None = None) -> Path:
    """<root>/<name> (root: var/bench): a LlamaForCausalLM of `shape` (LlamaConfig keys) with seeded random
    weights, saved in `dtype` ("float32" or "bfloat16") as safetensors shards of at most `max_shard_size`."""
    out = Path(root or var_dir() / "bench") / name
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from workers.config.files import publish_dir
    from workers.engine.loader import release_freed_memory
    from workers.models.embedded import prepare as prepare_embedded

    print(f"bench: generating a random-weight {name} model in {dtype} (once)", flush=True)
    config = LlamaConfig(**shape, tie_word_embeddings=False, torch_dtype=dtype)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # built in `dtype`: a bf16 7 B model never exists in fp32
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    print(f"bench: {sum(p.numel() for p in model.parameters()):,} parameters; saving", flush=True)
    with publish_dir(out) as staging:
        model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        # ids < 49152: they fit every vocabulary here but llama-1.1b's 32000 (a measured prompt may index past it)
        AutoTokenizer.from_pretrained(prepare_embedded()).save_pretrained(staging)
    del model
    release_freed_memory()  # a child process measured next needs this memory back
    return out
