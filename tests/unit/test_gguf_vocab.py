"""The test tokenizers built from the llama-cpp-python sdist's GGUF vocabularies agree with llama.cpp's own
test vectors (tests/gguf_vocab.py; the tiny family models in tests/tiny_families.py use them)."""
from __future__ import annotations

import pytest

from tests import gguf_vocab


@pytest.mark.parametrize("name", ["qwen2", "llama-bpe", "phi-3", "llama-spm", "gemma-4"])
def test_tokenizer_encodes_llama_cpps_test_vectors(name):
    tokenizer = gguf_vocab.build_tokenizer(name)
    assert len(gguf_vocab.test_vectors(name)) >= 40
    assert gguf_vocab.check_vectors(name, tokenizer) == []


def test_a_wrong_pre_tokenizer_is_caught(monkeypatch):
    """With GPT-2's own pre-tokenizer regex instead of Qwen2's (numbers, newlines, contractions split
    differently) the vectors disagree."""
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    monkeypatch.setattr(gguf_vocab, "QWEN2_SPLIT", gpt2)
    assert gguf_vocab.check_vectors("qwen2", gguf_vocab.build_tokenizer("qwen2"))
