"""A reasoning model through the supervised bundle, with the official openai client: the thinking as
reasoning_content, the answer as content, streamed and not (DeepSeek's API shape), and chat_template_kwargs.

The model is tests/tiny_families.py's DeepSeek-R1-Distill-Qwen (model_type qwen2: the pinned environment runs
it) with its real tokenizer and chat template (the llama-cpp-python sdist's copy, which closes the thinking block
in the prompt unless `enable_thinking` is true; DeepSeek's own always leaves it open). Its weights are then
steered (the "bigram chain" of tests/tiny_models.py) so that greedy decoding after the generation prompt writes
"Let me think</think>The answer" and then its end-of-sentence token, whatever the conversation.
"""
from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import requests
from openai import OpenAI
from safetensors.torch import load_file, save_file

from tests import tiny_families
from tests.helpers import free_port, running_bundle

MODEL = "r1-tiny"
HELLO = [{"role": "user", "content": "Hello"}]
THINK = {"chat_template_kwargs": {"enable_thinking": True}}  # the template opens <think> in the prompt
REASONING, ANSWER = "Let me think", "The answer"


def steer(folder: Path, after: int, sequence: list[int]) -> None:
    """Greedy decoding after token `after` writes `sequence` (its last id: the stop token). An untied checkpoint:
    each token's input row gets its own direction, and the row of the token meant to follow it in the output
    layer points the same way (tests/tiny_models.py explains the margins)."""
    import torch

    weights = load_file(str(folder / "model.safetensors"))
    emb, out = weights["model.embed_tokens.weight"].float(), weights["lm_head.weight"].float()
    hidden = emb.shape[1]
    chain = [after, *sequence]
    directions, _ = torch.linalg.qr(torch.randn(hidden, len(chain), generator=torch.Generator().manual_seed(7)))
    for k, (cur, nxt) in enumerate(zip(chain, chain[1:])):
        emb[cur] = directions[:, k] * hidden ** 0.5
        out[nxt] = directions[:, k]
    weights["model.embed_tokens.weight"], weights["lm_head.weight"] = emb.bfloat16(), out.bfloat16()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def r1_folder(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    folder = tiny_families.build("r1-distill-qwen", tmp_path_factory.mktemp("r1") / "model", turn_end_after=None)
    tok = AutoTokenizer.from_pretrained(str(folder))
    opened = tok.apply_chat_template(HELLO, add_generation_prompt=True, **THINK["chat_template_kwargs"])
    closed = tok.apply_chat_template(HELLO, add_generation_prompt=True)
    think, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert opened[-2] == think and closed[-1] == end  # "<think>\n" / "<think>\n</think>"
    words = [tok.encode(w, add_special_tokens=False) for w in (REASONING, ANSWER)]
    # after "<think>\n": the thinking, </think>, the answer; after a closed block (</think>): the answer
    steer(folder, opened[-1], [*words[0], end, *words[1], tok.convert_tokens_to_ids("<｜end▁of▁sentence｜>")])
    return folder


@pytest.fixture(scope="module")
def bundle(r1_folder, tmp_path_factory):
    var = tmp_path_factory.mktemp("var")
    models = [{"names": [MODEL], "source": {"path": str(r1_folder)}, "backend": "fp32", "port": free_port(),
               "threads": 1, "limit_concurrency": 2, "prefix_cache_tokens": 0}]
    with running_bundle(var, models, var / "models", var / "int8") as b:
        yield b


@pytest.fixture(scope="module")
def client(bundle) -> OpenAI:
    return OpenAI(base_url=bundle["api"], api_key="unused", max_retries=0, timeout=180)


def test_the_thinking_comes_back_as_reasoning_content(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=20, extra_body=THINK)
    message = r.choices[0].message
    assert (message.reasoning_content, message.content) == (REASONING, ANSWER)
    assert r.choices[0].finish_reason == "stop"


def test_the_stream_sends_reasoning_first_and_adds_up_to_the_answer(client):
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=20, stream=True,
                                            extra_body=THINK)
    fields = []
    for chunk in stream:
        delta = chunk.choices[0].delta
        for name in ("reasoning_content", "content"):
            value = getattr(delta, name, None)
            if value:
                fields.append((name, value))
    names = [name for name, _ in fields]
    assert names == sorted(names, key=lambda n: n != "reasoning_content") and len(names) >= 3
    assert "".join(v for n, v in fields if n == "reasoning_content") == REASONING
    assert "".join(v for n, v in fields if n == "content") == ANSWER
    assert not any("think>" in v for _, v in fields)


def test_a_prompt_that_closes_the_thinking_block_gets_a_plain_answer(client):
    # This template closes the block unless enable_thinking is true (Qwen3's enable_thinking false does the same)
    off = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=20,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert (off.choices[0].message.reasoning_content, off.choices[0].message.content) == (None, ANSWER)
    on = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=20, extra_body=THINK)
    assert on.usage.prompt_tokens == off.usage.prompt_tokens - 1  # the "</think>" the template wrote


def test_thinking_cut_by_max_tokens_is_all_reasoning(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=2, extra_body=THINK)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("Let me", "")
    assert r.choices[0].finish_reason == "length"


def test_bad_chat_template_kwargs_are_400_naming_them(client, bundle):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, extra_body={"chat_template_kwargs": "think"})
    assert caught.value.body["param"] == "chat_template_kwargs"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO,
                                       extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    assert caught.value.body["param"] == "chat_template_kwargs"
    assert "may not set add_generation_prompt" in caught.value.body["message"]


def test_completions_return_the_raw_text_and_the_web_page_gets_balanced_markers(client, bundle):
    r = client.completions.create(model=MODEL, prompt="<｜User｜>Hello<｜Assistant｜><think>\n", max_tokens=20,
                                  temperature=0)
    assert r.choices[0].text == f"{REASONING}</think>{ANSWER}"
    # the worker's own stream (what the web page reads): the opening marker the template wrote is put back
    worker = requests.post(bundle["controller"] + "/get_worker_address", json={"model": MODEL}, timeout=10).json()
    raw = requests.post(worker["address"] + "/worker_generate", timeout=60, json={
        "model": MODEL, "messages": HELLO, "temperature": 0, "max_new_tokens": 20, **THINK})
    body = raw.json()
    assert (body["text"], body["reasoning_content"], body["content"]) == (
        f"<think>{REASONING}</think>{ANSWER}", REASONING, ANSWER)
    assert json.dumps(body, ensure_ascii=False).count("<think>") == 1
