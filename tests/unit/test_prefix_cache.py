"""Prefix reuse: a chat's next turn reuses the KV cache of the earlier turns, and answers exactly as
without reuse (greedy, token for token), on every family: SmolLM2 (transformers' Llama), tiny
ChatGLM3 and tiny Qwen-7B-Chat (their own remote code, three different cache layouts)."""
from __future__ import annotations

import shutil

import pytest
import torch

from tests import tiny_models
from workers.config.schema import ModelSpec
from workers.engine.loader import load_model
from workers.engine.prefix_cache import MIN_REUSE_TOKENS, PrefixCache
from workers.engine.served_model import ServedModel

TURNS = ["Tell me about Paris in three sentences.", "And its museums?", "你最喜欢哪一个？"]
# A long system prompt, as real deployments have: the history then outweighs each new message,
# which is when Qwen (one forward per new token) reuses the cache too.
SYSTEM = ("You are a travel guide for Paris. Answer briefly and precisely, in the language of the question. "
          "Mention opening hours and prices only when you are sure of them. ") * 4


def served(folder, backend="fp32", prefix_tokens=4096, trust=False) -> ServedModel:
    spec = ModelSpec(names=["m"], source={"path": str(folder)}, port=1, backend=backend,
                     prefix_cache_tokens=prefix_tokens, trust_remote_code=trust)
    model, tokenizer = load_model(folder, backend, trust_remote_code=trust)
    return ServedModel.build(spec, folder, model, tokenizer)


def chat_both_ways(folder, trust=False, max_tokens=16):
    """Three turns with and without the prefix cache; returns [(with, without)] results per turn."""
    reusing, fresh = served(folder, trust=trust), served(folder, prefix_tokens=0, trust=trust)
    messages, turns = [{"role": "system", "content": SYSTEM}], []
    for text in TURNS:
        messages.append({"role": "user", "content": text})
        results = []
        for sm in (reusing, fresh):
            job, _ = sm.job({"messages": messages, "temperature": 0, "max_new_tokens": max_tokens})
            results.append(sm.generate(job))
        turns.append(results)
        messages.append({"role": "assistant", "content": results[1].text})
    return turns, reusing


def assert_same_and_reused(turns, reusing):
    for i, (a, b) in enumerate(turns):
        assert (a.text, a.completion_tokens, a.finish_reason) == (b.text, b.completion_tokens, b.finish_reason), i
        assert b.reused_tokens == 0
    assert turns[0][0].reused_tokens == 0
    assert all(a.reused_tokens >= MIN_REUSE_TOKENS for a, _ in turns[1:]), [a.reused_tokens for a, _ in turns]
    assert reusing.prefixes.tokens <= reusing.prefixes.max_tokens


def test_smollm2_reuses_the_chat_and_answers_the_same(embedded_model, tmp_path):
    folder = tmp_path / "my-model"
    shutil.copytree(embedded_model, folder)
    assert_same_and_reused(*chat_both_ways(folder))


@pytest.mark.skipif(tiny_models.model_code_missing() is not None, reason=str(tiny_models.model_code_missing()))
@pytest.mark.parametrize("build", [tiny_models.build_chatglm3, tiny_models.build_qwen], ids=["chatglm3", "qwen"])
def test_remote_code_families_reuse_the_chat_and_answer_the_same(build, tmp_path):
    folder = build(tmp_path / "model")
    assert_same_and_reused(*chat_both_ways(folder, trust=True))


def _past(length: int, layers: int = 2):
    return tuple((torch.randn(1, 2, length, 4), torch.randn(1, 2, length, 4)) for _ in range(layers))


def test_cache_keeps_the_longest_match_and_stays_within_its_token_budget():
    cache = PrefixCache(max_tokens=40)
    first = list(range(20))
    assert cache.store(first, _past(20))
    entry, n = cache.longest(first + [99, 98])
    assert entry is not None and n == 20
    assert cache.longest(first)[1] == 19  # one prompt token is always left to compute
    assert cache.longest([7] * 30) == (None, 0)
    longer = first + list(range(100, 110))
    assert cache.store(longer, _past(30))  # supersedes the entry it extends
    assert cache.tokens == 30
    assert cache.store(list(range(200, 225)), _past(25))  # over budget: the least recent goes
    assert cache.tokens == 25 and cache.longest(longer + [1])[0] is None


def test_cache_refuses_what_it_cannot_keep():
    cache = PrefixCache(max_tokens=16)
    assert not cache.store(list(range(20)), _past(20))        # longer than the budget
    assert not cache.store(list(range(4)), _past(4))          # too short to be worth it
    ambiguous = tuple((torch.randn(1, 10, 10, 4), torch.randn(1, 10, 10, 4)) for _ in range(2))
    assert not cache.store(list(range(10)), ambiguous)        # which axis is the sequence?
    assert not PrefixCache(0).store(list(range(10)), _past(10))
