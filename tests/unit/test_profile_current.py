"""conf/seed-current.yaml: a current model (Qwen3-8B INT8) next to a seed model, within 2 cores and 24 GiB."""
from __future__ import annotations

from workers.config import deployment
from workers.config.files import GIB
from workers.models import families, memory_budget
from workers.models.memory_budget import Need, shape_from_config

# Qwen3-8B's published config.json and its weight index's total_size (8,190,735,360 bf16 parameters).
QWEN3_8B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "max_position_embeddings": 40960, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
QWEN3_8B_TOTAL_BYTES = 16_381_470_720
# ChatGLM3-6B's (tests/unit/test_seed_models.py has the whole config)
CHATGLM3_CONFIG = {"model_type": "chatglm", "hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32,
                   "kv_channels": 128, "multi_query_attention": True, "multi_query_group_num": 2,
                   "padded_vocab_size": 65024, "torch_dtype": "float16"}
CHATGLM3_TOTAL_BYTES = 12_487_168_064
SHAPES = {"chatglm3-6b": shape_from_config(CHATGLM3_CONFIG, CHATGLM3_TOTAL_BYTES),
          "qwen3-8b": shape_from_config(QWEN3_8B_CONFIG, QWEN3_8B_TOTAL_BYTES)}


def needs(dep) -> list[Need]:
    return [Need(m.program, m.backend, SHAPES[m.program], m.limit_concurrency, m.int8.group_size,
                 m.prefix_cache_tokens) for m in dep.models]


def test_the_profile_parses_on_two_cores_one_core_per_worker():
    dep = deployment.load("seed-current", cpu_count=2)
    assert [(m.program, m.backend, m.threads, m.cpu_cores) for m in dep.models] == [
        ("chatglm3-6b", "itrex-int8", 1, [0]), ("qwen3-8b", "itrex-int8", 1, [1])]
    for m in dep.models:  # ids the bundle knows, of the model_type the shapes above have
        assert families.known_model(m.source.modelscope).model_type == (
            "chatglm" if m.program == "chatglm3-6b" else "qwen3")


def test_its_memory_check_passes_on_24_gib_with_the_real_shapes():
    dep = deployment.load("seed-current", cpu_count=2)
    assert memory_budget.check(needs(dep), 24 * GIB) is None
    qwen3 = needs(dep)[1]
    assert SHAPES["qwen3-8b"].params == 8_190_735_360
    assert SHAPES["qwen3-8b"].kv_bytes_per_token == 36 * 8 * 128 * 2 * 4  # 288 KiB
    assert 12 * GIB < qwen3.bytes < 13.5 * GIB


def test_all_three_seed_and_current_models_would_not_fit_in_24_gib():
    """Why the profile has two models: Qwen-7B-Chat next to them is refused by the same check."""
    qwen7b = shape_from_config({"model_type": "qwen", "hidden_size": 4096, "num_hidden_layers": 32,
                                "num_attention_heads": 32, "kv_channels": 128, "vocab_size": 151936,
                                "torch_dtype": "bfloat16"}, 15_442_649_088)
    three = needs(deployment.load("seed-current", cpu_count=2)) + [Need("qwen-7b-chat", "itrex-int8", qwen7b, 1, "auto",
                                                                         512)]
    message = memory_budget.check(three, 24 * GIB)
    assert message.startswith("not enough memory: the workers need about 3")  # 36.8 GiB


def test_head_dim_counts_in_the_kv_cache():
    qwen3_4b = {"hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                "head_dim": 128}
    assert memory_budget.kv_bytes_per_token(qwen3_4b) == 36 * 8 * 128 * 2 * 4
