"""The memory budget's estimate of a worker counts what its runtime really holds (workers/models/memory_budget.py).

Its integration proof is `python -m workers.tools.memory_check`, whose measured figures are in docs/models.md;
these pin the parts of the estimate that a measurement found, on the pure estimate functions.
"""
from __future__ import annotations

from workers.config.files import GIB
from workers.models import families, memory_budget
from workers.models.memory_budget import Need, shape_from_config

# Qwen/Qwen3-30B-A3B's config.json; 30,532,122,624 parameters in bf16 (its weight index's total_size), of which
# 128 experts of 768 in each of the 48 layers make 28.99 B, while only 8 of them run for a token.
QWEN3_30B_A3B_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
    "max_position_embeddings": 40960, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
QWEN3_30B_A3B_TOTAL_BYTES = 61_064_245_248


def test_a_moe_model_counts_every_expert_not_only_the_routed_ones():
    shape = shape_from_config(QWEN3_30B_A3B_CONFIG, QWEN3_30B_A3B_TOTAL_BYTES)
    assert shape.params == 30_532_122_624
    assert shape.kv_bytes_per_token == 48 * 4 * 128 * 2 * 4  # 192 KiB
    int8 = Need("qwen3-30b-a3b", "itrex-int8", shape, 1, "auto").bytes
    assert 30 * GIB < int8 < 36 * GIB  # every expert's INT8 weights: the 3.3 B active ones alone would be ~5 GiB


def test_start_refuses_a_qwen3_30b_a3b_that_does_not_fit_naming_it():
    shape = shape_from_config(QWEN3_30B_A3B_CONFIG, QWEN3_30B_A3B_TOTAL_BYTES)
    message = memory_budget.check([Need("qwen3-30b-a3b", "itrex-int8", shape, 1, "auto")], 24 * GIB)
    assert message.startswith("not enough memory: the workers need about 3")
    assert "qwen3-30b-a3b (itrex-int8): about 3" in message
    assert "in itrex-int8 these would: none" in message


def test_qwen3_moe_is_family_data_like_qwen3():
    moe, dense = {"model_type": "qwen3_moe"}, {"model_type": "qwen3"}
    assert families.known_model("Qwen/Qwen3-30B-A3B").model_type == "qwen3_moe"
    assert families.model_files(moe) == families.model_files(dense)
    assert families.environment_for(moe)[0] is families.environment_for(dense)[0]
    template = "{{ '<think>\\n\\n</think>\\n\\n' }}"
    assert families.reasoning_markers(moe, lambda t: True, template) == families.reasoning_markers(
        dense, lambda t: True, template)


def test_the_checkpoint_dtype_is_read_under_both_names():
    """transformers >= 4.56 writes config.json's "dtype" where earlier versions wrote "torch_dtype": a bf16
    checkpoint read as fp32 halved its parameter count (memory_check's Qwen2.5-1.5B shape: 2.36 GiB estimated
    for 2.83 GiB measured)."""
    config = {k: v for k, v in QWEN3_30B_A3B_CONFIG.items() if k != "torch_dtype"}
    old = shape_from_config({**config, "torch_dtype": "bfloat16"}, QWEN3_30B_A3B_TOTAL_BYTES)
    new = shape_from_config({**config, "dtype": "bfloat16"}, QWEN3_30B_A3B_TOTAL_BYTES)
    assert new == old and new.params == 30_532_122_624
