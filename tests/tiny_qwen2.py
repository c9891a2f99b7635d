"""A tiny random-weight Qwen2 folder with Qwen2.5's tokenizer and chat template: a Hermes-style tool-calling
model (`<tool_call>` JSON) that loads on the pinned transformers 4.40 (model_type qwen2).

The tokenizer is tests/tiny_families.py's Qwen2.5 one (Qwen2's GGUF vocabulary from the llama-cpp-python
sdist, tests/gguf_vocab.py); `check_tokenizer` compares it with llama.cpp's test vectors for that vocabulary.
"""
from __future__ import annotations

import json
from pathlib import Path

from tests import gguf_vocab, tiny_families

FAMILY = tiny_families.FAMILIES["qwen2.5"]
IM_END, ENDOFTEXT = 151645, 151643


def tokenizer():
    """Qwen2.5's tokenizer (vocabulary, special tokens, chat template)."""
    return tiny_families.build_tokenizer(FAMILY)


def check_tokenizer(tok) -> list[str]:
    """Differences from llama.cpp's test vectors (empty: the tokenizer encodes as Qwen2's own)."""
    return gguf_vocab.check_vectors(FAMILY.vocab, tok.backend_tokenizer)


def build(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen2 (hidden 64) with random N(0, 0.02) weights and Qwen2.5's tokenizer and template."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=ENDOFTEXT, eos_token_id=IM_END,
                         torch_dtype="float32", architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer().save_pretrained(folder)
    GenerationConfig(bos_token_id=ENDOFTEXT, eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT).save_pretrained(folder)
    (folder / "tiny_qwen2.json").write_text(json.dumps({"seed": seed, "source": FAMILY.real}))
    return folder
