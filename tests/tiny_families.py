"""Tiny random-weight models of today's model families, with their real tokenizers and chat templates.

Each `TinyFamily` is a checkpoint's config.json shrunk to 2 layers and a small width, keeping what makes
the family itself: rope scaling (Llama 3.1 `llama3`, Phi-3.5 `longrope`), qk-norm (Qwen3, Gemma 3), a
head_dim that is not hidden/heads, sliding windows (Gemma 2/3, small enough that a chat prompt
crosses them), logit soft-capping (Gemma 2), partial rotary (GLM), fused projections (Phi-3), no-rope
layers (SmolLM3), routed experts (Qwen3-MoE), tied embeddings and grouped-query attention. Tokenizers
are built from the vocab-only GGUF files in llama-cpp-python's sdist (tests/gguf_vocab.py, checked on
llama.cpp's test vectors) with the family's special tokens at their real ids; where the sdist has no
vocabulary of the family, `stand_in` says which one is used instead. Chat templates are the sdist's
copies of the real ones (models/templates/*.jinja), or written out below where the sdist has none
(`TEMPLATES`).

`build(name, folder)` writes a complete model folder (config.json, generation_config.json with the
real eos ids, tokenizer files with the chat template, model.safetensors in bfloat16 as the real
checkpoints ship). It needs a transformers that knows the family: run it in the environment the
bundle gives the family (`python -m tests.tiny_families build NAME FOLDER`, see `build_in`), as
`reference` (transformers' own generate() on apply_chat_template, greedy, in float32) must be.

`turn_end_after=N` steers greedy answers: whatever the conversation, the answer is N fixed ordinary
tokens and then the family's turn-end token (its first generation_config eos id the template writes),
so answers stop by the family's own stop token (tests/tiny_models.py explains the "bigram chain";
with tied embeddings, where one matrix is both input and output, each chain row is made larger than
the one before and shares a direction with it, so the next token always scores highest).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python -m tests.tiny_families` from another environment
    sys.path.insert(0, str(ROOT))

from tests import gguf_vocab  # noqa: E402
from tests.chat_cases import CHAT_CASES  # noqa: E402,F401 (test_families imports it from here)

INIT_STD = 0.02
CHAIN_TEXT = "Hello from a tiny model that stops here"
# A plain-text prompt for /v1/completions: no newline (a chain start in several templates).
COMPLETION_PROMPT = "The quick brown fox jumps over the lazy dog because"

_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}

# Special tokens of the Qwen2.5/Qwen3 tokenizers after <|im_end|> (qwen2's GGUF has placeholders there);
# True: special (skipped when decoding), False: an added token that stays in decoded text.
QWEN25_ADDED = {151646: ("<|object_ref_start|>", True), 151647: ("<|object_ref_end|>", True),
                151648: ("<|box_start|>", True), 151649: ("<|box_end|>", True), 151650: ("<|quad_start|>", True),
                151651: ("<|quad_end|>", True), 151652: ("<|vision_start|>", True), 151653: ("<|vision_end|>", True),
                151654: ("<|vision_pad|>", True), 151655: ("<|image_pad|>", True), 151656: ("<|video_pad|>", True),
                151657: ("<tool_call>", False), 151658: ("</tool_call>", False), 151659: ("<|fim_prefix|>", False),
                151660: ("<|fim_middle|>", False), 151661: ("<|fim_suffix|>", False), 151662: ("<|fim_pad|>", False),
                151663: ("<|repo_name|>", False), 151664: ("<|file_sep|>", False)}
QWEN3_ADDED = {**QWEN25_ADDED, 151665: ("<tool_response>", False), 151666: ("</tool_response>", False),
               151667: ("<think>", False), 151668: ("</think>", False)}
# DeepSeek-R1-Distill-Qwen: DeepSeek's own specials over Qwen's from 151643 on.
R1_QWEN_ADDED = {151643: ("<｜end▁of▁sentence｜>", True), 151644: ("<｜User｜>", False),
                 151645: ("<｜Assistant｜>", False), 151646: ("<｜begin▁of▁sentence｜>", True),
                 151647: ("<|EOT|>", False), 151648: ("<think>", False), 151649: ("</think>", False),
                 151650: ("<｜▁pad▁｜>", True)}
# Llama 3.1+ names for some of Llama 3's reserved special tokens.
LLAMA31_ADDED = {128004: ("<|finetune_right_pad_id|>", True), 128005: ("<|reserved_special_token_2|>", True),
                 128008: ("<|eom_id|>", True), 128010: ("<|python_tag|>", True)}
SMOLLM3_ADDED = {**LLAMA31_ADDED, 128011: ("<|im_start|>", True), 128012: ("<|im_end|>", True)}
R1_LLAMA_ADDED = {128000: ("<｜begin▁of▁sentence｜>", True), 128001: ("<｜end▁of▁sentence｜>", True),
                  128011: ("<｜User｜>", False), 128012: ("<｜Assistant｜>", False), 128013: ("<think>", False),
                  128014: ("</think>", False), 128015: ("<｜▁pad▁｜>", True)}
# Phi-4 (cl100k_base, the first 100,256 ids of Llama 3's vocabulary, plus its own specials).
PHI4_ADDED = {100257: ("<|endoftext|>", True), 100258: ("<|fim_prefix|>", True), 100259: ("<|fim_middle|>", True),
              100260: ("<|fim_suffix|>", True), 100264: ("<|im_start|>", True), 100265: ("<|im_end|>", True),
              100266: ("<|im_sep|>", True), 100276: ("<|endofprompt|>", True)}
# GLM-4 (its 151,552-id tiktoken vocabulary is not in the sdist: cl100k_base stands in for the text part).
GLM4_ADDED = {151329: ("<|endoftext|>", True), 151330: ("[MASK]", True), 151331: ("[gMASK]", True),
              151332: ("[sMASK]", True), 151333: ("<sop>", True), 151334: ("<eop>", True),
              151335: ("<|system|>", True), 151336: ("<|user|>", True), 151337: ("<|assistant|>", True),
              151338: ("<|observation|>", True), 151339: ("<|begin_of_image|>", True),
              151340: ("<|end_of_image|>", True), 151341: ("<|begin_of_video|>", True),
              151342: ("<|end_of_video|>", True)}
# Gemma 2/3 turn markers where Gemma 3's (and the sdist's Gemma 4) vocabulary has them.
GEMMA_ADDED = {105: ("<start_of_turn>", True), 106: ("<end_of_turn>", True)}
MISTRAL_ADDED = {32000: ("[INST]", True), 32001: ("[/INST]", True)}

# Real chat templates the sdist has no copy of: their text path (no tools), as the checkpoints' own
# tokenizer_config.json writes it.
TEMPLATES = {
    "phi-4": (
        "{% for message in messages %}{% if (message['role'] == 'system') %}"
        "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
        "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
        "{% elif (message['role'] == 'assistant') %}"
        "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"),
    "gemma-3": (
        "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n"
        "    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
        "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n"
        "    {%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n"
        "{%- for message in loop_messages -%}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
        "    {%- endif -%}\n"
        "    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
        "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
        "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
        "    {{ message['content'] | trim }}\n"
        "    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"),
    "glm-4-9b-chat-hf": (
        "[gMASK]<sop>{% for item in messages %}{% if item['role'] == 'user' %}<|user|>\n{{ item['content'] }}"
        "{% elif item['role'] == 'assistant' %}<|assistant|>\n{{ item['content'] }}"
        "{% elif item['role'] == 'system' %}<|system|>\n{{ item['content'] }}"
        "{% elif item['role'] == 'observation' %}<|observation|>\n{{ item['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"),
    "glm-4-0414": (
        "[gMASK]<sop>{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}"
        "{%- endif %}{%- endfor %}{%- for message in messages if message.role != 'system' %}"
        "{%- if message.role == 'user' %}<|user|>\n{{ message.content }}"
        "{%- elif message.role == 'assistant' %}<|assistant|>\n{{ message.content }}{%- endif %}{%- endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"),
}


@dataclass(frozen=True)
class TinyFamily:
    name: str
    real: str                                   # the checkpoint whose config.json is shrunk
    config: dict                                # config.json (real values, shrunk sizes)
    vocab: str                                  # GGUF vocab in the sdist (ggml-vocab-<vocab>.gguf)
    template: str                               # sdist template name, or a key of TEMPLATES
    generation_config: dict
    added: dict = field(default_factory=dict)   # id -> (text, special) over the GGUF vocab
    vocab_keep: int | None = None               # use only the first ids of the GGUF vocab
    bos: str | None = None                      # tokenizer's bos_token; added when encoding plain text if add_bos
    add_bos: bool = False
    eos: str | None = None                      # tokenizer's eos_token
    pad: str | None = None
    stand_in: str = ""                          # what stands in for a vocabulary the sdist lacks
    thinks: bool = False                        # answers with a <think> part (reasoning models)

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]


def _cfg(arch: str, model_type: str, **values) -> dict:
    return {"architectures": [arch], "model_type": model_type, **_TINY, "hidden_act": "silu",
            "initializer_range": 0.02, "torch_dtype": "bfloat16", "use_cache": True, **values}


_QWEN25_CFG = dict(attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645, max_position_embeddings=32768,
                   max_window_layers=2, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768,
                   use_sliding_window=False, vocab_size=151936)
_LLAMA31_CFG = dict(attention_bias=False, attention_dropout=0.0, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                    max_position_embeddings=131072, mlp_bias=False, pretraining_tp=1, rms_norm_eps=1e-5,
                    rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                    rope_theta=500000.0, tie_word_embeddings=False, vocab_size=128256)
_LLAMA31_GEN = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
                "temperature": 0.6, "top_p": 0.9}
_GLM_GEN = {"do_sample": True, "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329, "temperature": 0.8,
            "top_p": 0.8}
_GLM_STAND_IN = "cl100k_base (Llama 3's first 100,256 ids) for GLM-4's own 151,552-id vocabulary, GLM's specials at their ids"

FAMILIES: dict[str, TinyFamily] = {f.name: f for f in (
    TinyFamily(
        "qwen2.5", "Qwen/Qwen2.5-0.5B-Instruct",
        _cfg("Qwen2ForCausalLM", "qwen2", **_QWEN25_CFG, tie_word_embeddings=True),
        vocab="qwen2", template="Qwen-Qwen2.5-7B-Instruct", added=QWEN25_ADDED, eos="<|im_end|>", pad="<|endoftext|>",
        generation_config={"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                           "eos_token_id": [151645, 151643], "repetition_penalty": 1.1, "temperature": 0.7,
                           "top_p": 0.8, "top_k": 20}),
    TinyFamily(
        "qwen3", "Qwen/Qwen3-0.6B",  # head_dim 128 with hidden 1024 / 16 heads; q_norm and k_norm
        _cfg("Qwen3ForCausalLM", "qwen3", attention_bias=False, attention_dropout=0.0, bos_token_id=151643,
             eos_token_id=151645, head_dim=32, max_position_embeddings=40960, max_window_layers=2, rms_norm_eps=1e-6,
             rope_scaling=None, rope_theta=1000000, sliding_window=None, tie_word_embeddings=True,
             use_sliding_window=False, vocab_size=151936),
        vocab="qwen2", template="Qwen-Qwen3-0.6B", added=QWEN3_ADDED, eos="<|im_end|>", pad="<|endoftext|>", thinks=True,
        generation_config={"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                           "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95}),
    TinyFamily(
        "qwen3-moe", "Qwen/Qwen3-30B-A3B",  # every layer sparse: 128 experts of 768, 8 routed a token, renormalized
        _cfg("Qwen3MoeForCausalLM", "qwen3_moe", attention_bias=False, attention_dropout=0.0, bos_token_id=151643,
             decoder_sparse_step=1, eos_token_id=151645, head_dim=32, max_position_embeddings=40960,
             max_window_layers=2, mlp_only_layers=[], moe_intermediate_size=32, norm_topk_prob=True, num_experts=8,
             num_experts_per_tok=2, output_router_logits=False, rms_norm_eps=1e-6, rope_scaling=None,
             rope_theta=1000000.0, router_aux_loss_coef=0.001, sliding_window=None, tie_word_embeddings=False,
             use_sliding_window=False, vocab_size=151936),
        vocab="qwen2", template="Qwen-Qwen3-0.6B", added=QWEN3_ADDED, eos="<|im_end|>", pad="<|endoftext|>", thinks=True,
        generation_config={"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                           "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95}),
    TinyFamily(
        "llama3.1", "meta-llama/Llama-3.1-8B-Instruct",
        _cfg("LlamaForCausalLM", "llama", **_LLAMA31_CFG),
        vocab="llama-bpe", template="meta-llama-Llama-3.1-8B-Instruct", added=LLAMA31_ADDED,
        bos="<|begin_of_text|>", add_bos=True, eos="<|eot_id|>", generation_config=_LLAMA31_GEN),
    TinyFamily(
        "llama3.2", "meta-llama/Llama-3.2-1B-Instruct",
        _cfg("LlamaForCausalLM", "llama", **{**_LLAMA31_CFG, "head_dim": 16, "tie_word_embeddings": True,
                                            "rope_scaling": {**_LLAMA31_CFG["rope_scaling"], "factor": 32.0}}),
        vocab="llama-bpe", template="meta-llama-Llama-3.2-3B-Instruct", added=LLAMA31_ADDED,
        bos="<|begin_of_text|>", add_bos=True, eos="<|eot_id|>", generation_config=_LLAMA31_GEN),
    TinyFamily(
        "llama3.3", "meta-llama/Llama-3.3-70B-Instruct",
        _cfg("LlamaForCausalLM", "llama", **_LLAMA31_CFG),
        vocab="llama-bpe", template="meta-llama-Llama-3.3-70B-Instruct", added=LLAMA31_ADDED,
        bos="<|begin_of_text|>", add_bos=True, eos="<|eot_id|>", generation_config=_LLAMA31_GEN),
    TinyFamily(
        "phi3.5", "microsoft/Phi-3.5-mini-instruct",  # fused qkv_proj / gate_up_proj, longrope
        _cfg("Phi3ForCausalLM", "phi3", **{**_TINY, "num_key_value_heads": 4}, attention_bias=False,
             attention_dropout=0.0, bos_token_id=1, embd_pdrop=0.0, eos_token_id=32000, max_position_embeddings=131072,
             original_max_position_embeddings=4096, pad_token_id=32000, resid_pdrop=0.0, rms_norm_eps=1e-5,
             rope_scaling={"type": "longrope",
                           "long_factor": [1.08, 1.14, 1.59, 2.62, 12.4, 36.5, 49.8, 64.8],
                           "short_factor": [1.0, 1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.6]},
             rope_theta=10000.0, sliding_window=262143, tie_word_embeddings=False, vocab_size=32064),
        vocab="phi-3", template="microsoft-Phi-3.5-mini-instruct", bos="<s>", add_bos=True, eos="<|endoftext|>",
        pad="<|endoftext|>", generation_config={"bos_token_id": 1, "eos_token_id": [32007, 32001, 32000],
                                                "pad_token_id": 32000}),
    TinyFamily(
        "phi4", "microsoft/phi-4",
        _cfg("Phi3ForCausalLM", "phi3", attention_bias=False, bos_token_id=100257, eos_token_id=100265,
             max_position_embeddings=16384, original_max_position_embeddings=16384, pad_token_id=100349,
             rms_norm_eps=1e-5, rope_scaling=None, rope_theta=250000, sliding_window=None, tie_word_embeddings=False,
             vocab_size=100352),
        vocab="llama-bpe", vocab_keep=100256, template="phi-4", added=PHI4_ADDED, eos="<|im_end|>",
        pad="<|dummy_85|>", stand_in="none: cl100k_base is the first 100,256 ids of Llama 3's vocabulary",
        generation_config={"bos_token_id": 100257, "eos_token_id": 100265, "pad_token_id": 100349}),
    TinyFamily(
        "gemma2", "google/gemma-2-2b-it",  # head_dim 256 with hidden 2304 / 8 heads; soft-capping; sliding window
        _cfg("Gemma2ForCausalLM", "gemma2", attention_bias=False, attention_dropout=0.0, attn_logit_softcapping=50.0,
             bos_token_id=2, cache_implementation="hybrid", eos_token_id=[1, 106], final_logit_softcapping=30.0,
             head_dim=32, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
             max_position_embeddings=8192, pad_token_id=0, query_pre_attn_scalar=32, rms_norm_eps=1e-6,
             rope_theta=10000.0, sliding_window=16, tie_word_embeddings=True, vocab_size=262144),
        vocab="gemma-4", template="google-gemma-2-2b-it", added=GEMMA_ADDED, bos="<bos>", add_bos=True, eos="<eos>",
        pad="<pad>", stand_in="Gemma 3/4's 262,144-id vocabulary for Gemma 2's 256,000 (turn markers at 105/106, not 106/107)",
        generation_config={"bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
                           "pad_token_id": 0}),
    TinyFamily(
        "gemma3", "google/gemma-3-1b-it",  # local/global layers, qk-norm, sliding window 512
        _cfg("Gemma3ForCausalLM", "gemma3_text", **{**_TINY, "num_key_value_heads": 1}, attention_bias=False,
             attention_dropout=0.0, attn_logit_softcapping=None, bos_token_id=2, cache_implementation="hybrid",
             eos_token_id=[1, 106], final_logit_softcapping=None, head_dim=32, hidden_act="gelu_pytorch_tanh",
             hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768, pad_token_id=0,
             query_pre_attn_scalar=32, rms_norm_eps=1e-6, rope_local_base_freq=10000, rope_scaling=None,
             rope_theta=1000000, sliding_window=16, sliding_window_pattern=2, tie_word_embeddings=True,
             vocab_size=262144),
        vocab="gemma-4", template="gemma-3", added=GEMMA_ADDED, bos="<bos>", add_bos=True, eos="<eos>", pad="<pad>",
        stand_in="Gemma 4's vocabulary (the sdist's) for Gemma 3's: same size, turn markers at Gemma 3's ids",
        generation_config={"bos_token_id": 2, "cache_implementation": "hybrid", "do_sample": True,
                           "eos_token_id": [1, 106], "pad_token_id": 0, "top_k": 64, "top_p": 0.95}),
    TinyFamily(
        "glm4-hf", "THUDM/glm-4-9b-chat-hf",  # partial rotary 0.5, qkv bias
        _cfg("GlmForCausalLM", "glm", attention_bias=True, attention_dropout=0.0, eos_token_id=[151329, 151336, 151338],
             head_dim=16, max_position_embeddings=131072, pad_token_id=151329, partial_rotary_factor=0.5,
             rms_norm_eps=1.5625e-07, rope_theta=10000.0, tie_word_embeddings=False, vocab_size=151552),
        vocab="llama-bpe", vocab_keep=100256, template="glm-4-9b-chat-hf", added=GLM4_ADDED, eos="<|endoftext|>",
        pad="<|endoftext|>", stand_in=_GLM_STAND_IN, generation_config=_GLM_GEN),
    TinyFamily(
        "glm4-0414", "THUDM/GLM-4-9B-0414",  # glm4: extra post-attention/post-MLP norms, partial rotary
        _cfg("Glm4ForCausalLM", "glm4", attention_bias=True, attention_dropout=0.0, eos_token_id=[151329, 151336, 151338],
             head_dim=16, max_position_embeddings=32768, pad_token_id=151329, partial_rotary_factor=0.5,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, vocab_size=151552),
        vocab="llama-bpe", vocab_keep=100256, template="glm-4-0414", added=GLM4_ADDED, eos="<|user|>",
        pad="<|endoftext|>", stand_in=_GLM_STAND_IN, generation_config=_GLM_GEN),
    TinyFamily(
        "smollm3", "HuggingFaceTB/SmolLM3-3B",  # no rope on every 4th layer; Llama 3's vocabulary
        _cfg("SmolLM3ForCausalLM", "smollm3", attention_bias=False, attention_dropout=0.0, bos_token_id=None,
             eos_token_id=128012, max_position_embeddings=65536, mlp_bias=False, no_rope_layer_interval=4,
             no_rope_layers=[1, 0], pad_token_id=128004, rms_norm_eps=1e-6, rope_scaling=None, rope_theta=5000000.0,
             sliding_window=None, use_sliding_window=False, tie_word_embeddings=True, vocab_size=128256),
        vocab="llama-bpe", template="HuggingFaceTB-SmolLM3-3B", added=SMOLLM3_ADDED, eos="<|im_end|>",
        pad="<|im_end|>", thinks=True,
        generation_config={"bos_token_id": 128000, "eos_token_id": 128012, "pad_token_id": 128004,
                           "temperature": 0.6, "top_p": 0.95}),
    TinyFamily(
        "mistral-nemo", "mistralai/Mistral-Nemo-Instruct-2407",  # head_dim 128 with hidden 5120 / 32 heads
        _cfg("MistralForCausalLM", "mistral", attention_dropout=0.0, bos_token_id=1, eos_token_id=2, head_dim=32,
             max_position_embeddings=1024000, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None,
             tie_word_embeddings=False, vocab_size=32768),
        vocab="llama-spm", template="mistralai-Mistral-Nemo-Instruct-2407", added=MISTRAL_ADDED, bos="<s>",
        add_bos=True, eos="</s>", stand_in="Mistral 7B's 32,000-piece SentencePiece vocabulary for Tekken's 131,072",
        generation_config={"bos_token_id": 1, "eos_token_id": 2}),
    TinyFamily(
        "r1-distill-qwen", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        _cfg("Qwen2ForCausalLM", "qwen2", **{**_QWEN25_CFG, "bos_token_id": 151643, "eos_token_id": 151643,
                                            "sliding_window": 4096, "max_window_layers": 2},
             tie_word_embeddings=False),
        vocab="qwen2", template="deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", added=R1_QWEN_ADDED,
        bos="<｜begin▁of▁sentence｜>", add_bos=True, eos="<｜end▁of▁sentence｜>", pad="<｜end▁of▁sentence｜>", thinks=True,
        generation_config={"bos_token_id": 151646, "eos_token_id": 151643, "do_sample": True, "temperature": 0.6,
                           "top_p": 0.95}),
    TinyFamily(
        "r1-distill-llama", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
        _cfg("LlamaForCausalLM", "llama", **{**_LLAMA31_CFG, "eos_token_id": 128001}),
        vocab="llama-bpe", template="deepseek-ai-DeepSeek-R1-Distill-Llama-8B", added=R1_LLAMA_ADDED,
        bos="<｜begin▁of▁sentence｜>", add_bos=True, eos="<｜end▁of▁sentence｜>", pad="<｜end▁of▁sentence｜>", thinks=True,
        generation_config={"bos_token_id": 128000, "eos_token_id": 128001, "do_sample": True, "temperature": 0.6,
                           "top_p": 0.95}),
)}


# ------------------------------------------------------------------------------------- tokenizer

def chat_template(family: TinyFamily) -> str:
    return TEMPLATES.get(family.template) or gguf_vocab.template(family.template)


def build_tokenizer(family: TinyFamily):
    """A transformers fast tokenizer: the GGUF vocabulary, the family's special tokens, its chat template."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    renames = {i: text for i, (text, _) in family.added.items()}
    specials = tuple(i for i, (_, special) in family.added.items() if special)
    tok = gguf_vocab.build_tokenizer(family.vocab, renames=renames, size=family.vocab_keep,
                                     specials=specials, vocab_size=family.vocab_size)
    # Added tokens that are not special (Qwen's <think>, <tool_call>) stay in decoded text.
    tok.add_tokens([AddedToken(text, special=False, normalized=False)
                    for text, special in family.added.values() if not special])
    if family.add_bos:
        bos_id = tok.token_to_id(family.bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{family.bos} $A", pair=f"{family.bos} $A $B",
                                                           special_tokens=[(family.bos, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad, chat_template=chat_template(family),
                                   clean_up_tokenization_spaces=False, add_bos_token=family.add_bos)


# ----------------------------------------------------------------------------------------- model

def turn_end_id(family: TinyFamily, tokenizer) -> int:
    """The family's turn-end token: the first generation_config eos id its chat template writes."""
    eos = family.generation_config["eos_token_id"]
    text = chat_template(family)
    for i in eos if isinstance(eos, list) else [eos]:
        if tokenizer.convert_ids_to_tokens(i) in text:
            return i
    return eos[0] if isinstance(eos, list) else eos


def chain_start_id(tokenizer) -> int:
    """The last token of every generation prompt of this template."""
    ids = tokenizer.apply_chat_template(CHAT_CASES["single"], add_generation_prompt=True)
    return ids[-1]


def chain_token_ids(tokenizer, n: int, avoid: set[int]) -> list[int]:
    unique = []
    for i in tokenizer.encode(CHAIN_TEXT, add_special_tokens=False):
        if i not in unique and i not in avoid:
            unique.append(i)
    if n > len(unique):
        raise ValueError(f"turn_end_after={n}: at most {len(unique)}")
    return unique[:n]


def build(name: str, target: Path, *, seed: int = 0, turn_end_after: int | None = 3) -> Path:
    """A tiny model folder of family `name` at `target` (run in an environment whose transformers knows it)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    family = FAMILIES[name]
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(family.config, indent=2))
    (target / "generation_config.json").write_text(json.dumps(family.generation_config, indent=2))
    tokenizer = build_tokenizer(family)
    tokenizer.save_pretrained(str(target))

    config = AutoConfig.from_pretrained(str(target))
    torch.manual_seed(seed)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        for pname, param in model.named_parameters():
            if _is_norm_scale(pname):
                param.fill_(_norm_one(config))
            else:
                param.normal_(0.0, INIT_STD, generator=generator)
        if turn_end_after is not None:
            _install_chain(family, tokenizer, model, turn_end_after, seed)
        state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    # config.json stays the real one (save_pretrained would add this transformers' own keys)
    (target / "config.json").write_text(json.dumps(family.config, indent=2))
    return target


def _is_norm_scale(name: str) -> bool:
    return name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]


def _norm_one(config) -> float:
    """The norm weight that scales by one: Gemma's norms multiply by (1 + weight)."""
    return 0.0 if config.model_type.startswith("gemma") else 1.0


def _install_chain(family: TinyFamily, tokenizer, model, n: int, seed: int) -> None:
    import torch

    start = chain_start_id(tokenizer)
    end = turn_end_id(family, tokenizer)
    chain = chain_token_ids(tokenizer, n, {start, end})
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    hidden = emb.shape[1]
    generator = torch.Generator().manual_seed(10_000 + seed)
    directions, _ = torch.linalg.qr(torch.randn(hidden, n + 2, generator=generator))
    sequence = [start, *chain, end]
    if emb.data_ptr() != out.data_ptr():
        scale = hidden ** 0.5
        for k, (cur, nxt) in enumerate(zip(sequence, sequence[1:])):
            emb[cur] = directions[:, k] * scale
            out[nxt] = directions[:, k]
        return
    # Tied (one matrix is both input and output): a symmetric score cannot prefer the next row over a row's
    # own, so the final norm's scales do it. Row k = S g^k (2 e_n(k) + e_p(k) + e_p(k+1)) on basis dims whose
    # final-norm scale is -1 (n) or +1 (p): a row scores -2 against itself, +g against the next one (the
    # shared p dim), +1/g against the one before and 0 against all others.
    dims = torch.randperm(hidden, generator=generator)[: 2 * len(sequence) + 1].tolist()
    neg, pos = dims[:len(sequence)], dims[len(sequence):]
    growth, scale = 1.5, 4.0
    for k, tid in enumerate(sequence):
        row = torch.zeros(hidden)
        row[neg[k]], row[pos[k]], row[pos[k + 1]] = 2.0, 1.0, 1.0
        emb[tid] = row * scale * growth ** k
    norm = dict(model.named_parameters())[_final_norm_name(model)]
    offset = 1.0 - _norm_one(model.config)     # Gemma's norms scale by (1 + weight)
    norm[neg] = -1.0 - offset
    norm[pos] = 1.0 - offset


def _final_norm_name(model) -> str:
    names = [n for n, _ in model.named_parameters() if n.endswith("norm.weight") and ".layers." not in n]
    if len(names) != 1:
        raise ValueError(f"cannot tell the final norm among {names}")
    return names[0]


# ------------------------------------------------------------------------------------- reference

def reference(folder: Path, cases: dict[str, list[dict]], *, max_new_tokens: int,
              completion: str | None = None, completion_tokens: int = 8, dtype: str = "float32") -> dict:
    """transformers' own generate(), greedy, on apply_chat_template(messages, add_generation_prompt=True)
    for each case, stopping on generation_config's eos ids; and on the tokenizer's encoding of
    `completion` for plain-text completion. {case: {"prompt_ids", "output_ids" (without the stop
    token), "stop_id", "text"} or {"error": why the template refuses it}}."""
    import torch
    from jinja2 import TemplateError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = {}

    def run(ids, limit):
        with torch.no_grad():
            seq = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=limit, top_p=None, top_k=None, temperature=None)
        new = seq[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(new) if t in eos), None)
        output = new if cut is None else new[:cut]
        return {"prompt_ids": ids, "output_ids": output, "stop_id": None if cut is None else new[cut],
                "text": tokenizer.decode(output, skip_special_tokens=True)}

    for case, messages in cases.items():
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except TemplateError as exc:
            out[case] = {"error": str(exc)}
            continue
        out[case] = run(list(ids), max_new_tokens)
    if completion is not None:
        out["completion"] = run(tokenizer.encode(completion), completion_tokens)
    return out


# --------------------------------------------------------------------------- running in another env

CACHE = ROOT / "var" / "cache" / "tiny-families"


def environment_of(name: str):
    """The environment the bundle gives family `name` (workers/models/families.py decides from config.json)."""
    from workers.models.families import environment_for

    return environment_for(FAMILIES[name].config)[0]


def run_in(python: str | Path, *args: str, timeout: float = 900) -> dict:
    """`python -m tests.tiny_families ARGS` (in the environment a family's worker runs in); its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([str(python), "-m", "tests.tiny_families", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"tests.tiny_families {' '.join(args)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def built(names: list[str], *, seed: int = 0, turn_end_after: int | None = 3) -> dict[str, Path]:
    """Folders of the tiny models `names`, built in their own environments (one process per environment)
    and kept in var/cache/tiny-families under a key of the builder's source, the arguments and the
    environment's transformers version: a later session reuses them."""
    import hashlib

    from workers.config.environments import versions

    sources = b"".join((Path(__file__).parent / f).read_bytes() for f in ("tiny_families.py", "gguf_vocab.py"))
    out, todo = {}, {}
    for name in names:
        env = environment_of(name)
        key = hashlib.sha256(sources + json.dumps([name, seed, turn_end_after, env.name,
                                                    versions(env, ("transformers",))]).encode()).hexdigest()[:12]
        folder = CACHE / f"{name}-{key}"
        out[name] = folder
        if not (folder / "model.safetensors").is_file():
            todo.setdefault(env, []).append(name)
    for env, group in todo.items():
        args = ["build-many", str(CACHE), "--seed", str(seed)]
        args += ["--turn-end-after", str(turn_end_after)] if turn_end_after is not None else []
        args += [f"{name}={out[name].name}" for name in group]
        run_in(env.python(), *args)
    return out


def references(folders: dict[str, Path], *, max_new_tokens: int, cases: dict | None = None,
               completion: str | None = COMPLETION_PROMPT, completion_tokens: int = 8) -> dict[str, dict]:
    """`reference` for each family's folder, run in the family's own environment (one process per
    environment, the same transformers its worker runs)."""
    groups: dict = {}
    for name, folder in folders.items():
        groups.setdefault(environment_of(name), {})[name] = str(folder)
    out = {}
    for env, group in groups.items():
        args = ["reference-many", json.dumps(group), "--cases", json.dumps(cases or CHAT_CASES),
                "--max-new-tokens", str(max_new_tokens), "--completion-tokens", str(completion_tokens)]
        args += ["--completion", completion] if completion is not None else []
        out.update(run_in(env.python(), *args))
    return out


def _build_many(root: Path, pairs: list[str], seed: int, turn_end_after: int | None) -> None:
    import shutil
    import tempfile

    root.mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        name, folder = pair.split("=", 1)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=root))
        build(name, staging, seed=seed, turn_end_after=turn_end_after)
        if (root / folder).exists():
            shutil.rmtree(staging)
        else:
            staging.rename(root / folder)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.tiny_families")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("name", choices=sorted(FAMILIES))
    b.add_argument("folder", type=Path)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--turn-end-after", type=int, default=None)
    m = sub.add_parser("build-many")
    m.add_argument("root", type=Path)
    m.add_argument("pairs", nargs="+", help="NAME=FOLDER")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--turn-end-after", type=int, default=None)
    rm = sub.add_parser("reference-many")
    rm.add_argument("folders", help="JSON {name: folder}")
    r = sub.add_parser("reference")
    r.add_argument("folder", type=Path)
    for p in (r, rm):
        p.add_argument("--cases", default=json.dumps(CHAT_CASES))
        p.add_argument("--max-new-tokens", type=int, default=16)
        p.add_argument("--completion", default=None)
        p.add_argument("--completion-tokens", type=int, default=8)
        p.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    if args.cmd == "build-many":
        _build_many(args.root, args.pairs, args.seed, args.turn_end_after)
        print(json.dumps({"built": args.pairs}))
    elif args.cmd == "reference-many":
        import torch

        torch.set_num_threads(1)  # as the workers run (and the machine is shared)
        print(json.dumps({name: reference(Path(folder), json.loads(args.cases), max_new_tokens=args.max_new_tokens,
                                          completion=args.completion, completion_tokens=args.completion_tokens,
                                          dtype=args.dtype)
                          for name, folder in json.loads(args.folders).items()}))
    elif args.cmd == "build":
        build(args.name, args.folder, seed=args.seed, turn_end_after=args.turn_end_after)
        print(json.dumps({"folder": str(args.folder)}))
    else:
        print(json.dumps(reference(args.folder, json.loads(args.cases), max_new_tokens=args.max_new_tokens,
                                   completion=args.completion, completion_tokens=args.completion_tokens,
                                   dtype=args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
