"""How many KV cache slots a neural-speed worker batches in (engine/runtimes/neural_speed/model.batch_slots), and that the start-time
memory check counts them: each slot holds a whole context in f16, allocated at load."""
from __future__ import annotations

import json

from workers.config import deployment
from workers.engine.runtimes.neural_speed.model import MAX_SLOTS, SLOTS_KV_BYTES, batch_slots, slot_bytes, slots_for
from workers.models import memory_budget
from workers.models.families import neural_speed_graph
from workers.ops import cli

GIB = 2**30
LLAMA_2_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
              "num_hidden_layers": 32, "max_position_embeddings": 4096, "hidden_act": "silu"}
LLAMA_3_8B = {**LLAMA_2_7B, "num_key_value_heads": 8, "max_position_embeddings": 8192}
QWEN_7B = {"model_type": "qwen", "architectures": ["QWenLMHeadModel"], "hidden_size": 4096, "num_attention_heads": 32,
           "num_hidden_layers": 32, "seq_length": 8192, "no_bias": True, "rotary_pct": 1.0}
CHATGLM3_6B = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "hidden_size": 4096, "num_attention_heads": 32,
               "num_layers": 28, "seq_length": 8192, "multi_query_attention": True, "multi_query_group_num": 2,
               "rmsnorm": True, "add_qkv_bias": True, "add_bias_linear": False, "original_rope": True,
               "apply_residual_connection_post_layernorm": False, "post_layer_norm": True}


def test_twice_the_concurrency_in_slots_on_graphs_that_batch():
    llama = neural_speed_graph(LLAMA_2_7B)[0]
    small = 2**20
    assert [batch_slots(llama, n, small) for n in (1, 2, 4, 16)] == [1, 4, 8, MAX_SLOTS]
    # neural-speed 1.0 batches its llama and gptj graphs only: Qwen-7B and ChatGLM3-6B run one at a time
    assert slots_for(QWEN_7B, 4) == slots_for(CHATGLM3_6B, 4) == 1
    assert batch_slots(None, 4, small) == 1


def test_the_slots_kv_stays_within_its_bound():
    # f16 K and V of a whole context per slot: Llama-2-7B 4096 x 512 KiB = 2 GiB, Llama-3-8B (GQA) 8192 x 128 KiB = 1 GiB
    assert slot_bytes(LLAMA_2_7B, 4096) == 2 * GIB and slot_bytes(LLAMA_3_8B, 8192) == GIB
    assert slots_for(LLAMA_2_7B, 4) == 2 and slots_for(LLAMA_3_8B, 4) == 4
    # fewer than two would fit: no batching rather than one oversized slot beside the serial path
    assert slots_for({**LLAMA_2_7B, "max_position_embeddings": 16384}, 4) == 1
    for config in (LLAMA_2_7B, LLAMA_3_8B):
        context = config["max_position_embeddings"]
        assert slots_for(config, 4) * slot_bytes(config, context) <= SLOTS_KV_BYTES


def test_the_memory_check_counts_a_batching_neural_speed_workers_slots(embedded_model):
    int8, fp32 = deployment.load("default", cpu_count=2).models
    config = json.loads((embedded_model / "config.json").read_text())
    slots_kv = cli.runtime_kv_bytes(int8)
    assert slots_kv == 8 * slot_bytes(config, 8192)  # limit_concurrency 4: 8 slots of 8192 tokens
    assert cli.runtime_kv_bytes(fp32) == 0
    assert cli.runtime_kv_bytes(int8.model_copy(update={"batching": False})) == 0
    qbits = int8.model_copy(update={"int8": int8.int8.model_copy(update={"runtime": "qbits"})})
    assert cli.runtime_kv_bytes(qbits) == 0
    shape = memory_budget.shape_of_folder(embedded_model)
    need = memory_budget.Need(int8.program, "itrex-int8", shape, 4, "auto", 2048, slots_kv)
    without = memory_budget.Need(int8.program, "itrex-int8", shape, 4, "auto", 2048)
    assert need.bytes - without.bytes == slots_kv - shape.kv_bytes_per_token * (4 * 1024 + 2048)
    assert need.bytes_as("fp32") == without.bytes_as("fp32")  # slots are neural-speed's
