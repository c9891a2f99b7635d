"""The GGUF -> Hugging Face conversion of the embedded SmolLM2 is a correct model."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.models import embedded as embedded
from workers.models.gguf_to_hf import _unpermute_rope


def perplexity(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return torch.exp(model(ids, labels=ids).loss).item()


@pytest.fixture(scope="module")
def fp32(embedded_model):
    model = AutoModelForCausalLM.from_pretrained(embedded_model, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(embedded_model)


def test_config_keeps_gguf_hyperparameters(embedded_model):
    config = json.loads((embedded_model / "config.json").read_text())
    assert config["rope_theta"] == 100000.0
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True


def test_perplexity_is_that_of_a_correct_model(fp32, paragraph):
    model, tokenizer = fp32
    ppl = perplexity(model, tokenizer, paragraph)
    # Measured 16.1 on this paragraph (5.5-16 on ordinary prose); conversion mistakes give 18-140.
    assert 4.0 < ppl < 17.0, ppl


def test_wrong_rope_theta_is_detectable(embedded_model, fp32, paragraph):
    model, tokenizer = fp32
    wrong = AutoModelForCausalLM.from_pretrained(embedded_model, torch_dtype=torch.float32, rope_theta=10000.0)
    assert perplexity(wrong, tokenizer, paragraph) > 1.1 * perplexity(model, tokenizer, paragraph)


def test_skipping_the_qk_unpermute_is_detectable(embedded_model, fp32, paragraph):
    model, tokenizer = fp32
    broken = AutoModelForCausalLM.from_pretrained(embedded_model, torch_dtype=torch.float32).eval()
    config = broken.config

    def llama_cpp_permute(w, n_head):  # what convert_hf_to_gguf does; the converter must undo it
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    with torch.no_grad():
        for layer in broken.model.layers:
            q, k = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
            q.copy_(llama_cpp_permute(q, config.num_attention_heads))
            k.copy_(llama_cpp_permute(k, config.num_key_value_heads))
    assert perplexity(broken, tokenizer, paragraph) > 2 * perplexity(model, tokenizer, paragraph)


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.arange(12 * 3, dtype=torch.float32).reshape(12, 3).numpy()
    permuted = w.reshape(3, 2, 2, 3).swapaxes(1, 2).reshape(12, 3)
    assert (_unpermute_rope(permuted, 3) == w).all()


@pytest.mark.parametrize(
    "text",
    ["Hello, world! 12345", "你好，世界！今天天气很好。", "  tabs\tand\nnewlines  ", "emoji 🙂 and ÄÖÜ", "数学题：3+4=7"],
)
def test_tokenizer_round_trips(fp32, text):
    _, tokenizer = fp32
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_special_tokens_and_chat_template(fp32):
    _, tokenizer = fp32
    assert tokenizer("<|im_start|>user\nhi<|im_end|>").input_ids == [1, 4093, 198, 6004, 2]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_prepare_is_idempotent_and_reconverts_when_stale(tmp_path, embedded_model):
    out = tmp_path / "smollm2"
    shutil.copytree(embedded_model, out)  # the session's conversion, stamp included: one conversion less here
    first = embedded.prepare(out)
    stamp = first / embedded.STAMP
    converted_at = stamp.stat().st_mtime_ns
    assert embedded.prepare(out) == first
    assert stamp.stat().st_mtime_ns == converted_at  # second call converted nothing
    stamp.write_text("{}")  # a stale stamp means the folder is converted again
    embedded.prepare(out)
    assert json.loads(stamp.read_text())["gguf_sha256"]
    assert not list(tmp_path.glob(".partial-*"))
