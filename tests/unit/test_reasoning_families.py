"""Reasoning markers with the real tokenizers and chat templates of today's families (tests/tiny_families.py:
tokenizers from the llama-cpp-python sdist's GGUF vocabularies, the sdist's copies of the real templates).
No model is loaded: the prompt a request renders and the text a decoded answer gives are what decide the split."""
from __future__ import annotations

from functools import lru_cache

import pytest

from tests import tiny_families
from workers.engine.prompt import ChatFormat
from workers.engine.reasoning import Thinking

HELLO = [{"role": "user", "content": "Hello"}]
OFF, ON = {"enable_thinking": False}, {"enable_thinking": True}


@lru_cache(maxsize=None)
def chat_format(name: str, tmp) -> ChatFormat:
    family = tiny_families.FAMILIES[name]
    return ChatFormat(tmp, tiny_families.build_tokenizer(family), family.config)


@pytest.fixture(scope="module", autouse=True)
def free_formats():
    yield
    chat_format.cache_clear()  # the families' tokenizers: not kept for the rest of the session


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fmt")  # holds no generation_config.json: only the prompt matters here


@pytest.mark.parametrize("name,kwargs,opened", [
    ("qwen3", {}, False),                 # Qwen3 leaves <think> to the model
    ("qwen3", ON, False),
    ("qwen3", OFF, False),                # ... and closes an empty block to switch thinking off
    ("r1-distill-llama", {}, True),       # DeepSeek's template: "<｜Assistant｜><think>\n", always
    ("r1-distill-llama", OFF, True),
    ("r1-distill-qwen", ON, True),        # the sdist's copy opens it only with enable_thinking true
    ("r1-distill-qwen", {}, False),
])
def test_the_prompt_says_whether_the_answer_starts_inside_the_thinking(folder, name, kwargs, opened):
    chat = chat_format(name, folder)
    ids = chat.render(HELLO, kwargs)
    assert chat.thinking(ids) == Thinking("<think>", "</think>", opened)


def test_qwen3_enable_thinking_false_closes_an_empty_block_in_the_prompt(folder):
    chat = chat_format("qwen3", folder)
    off, on = chat.render(HELLO, OFF), chat.render(HELLO, ON)
    assert chat.tokenizer.decode(off[len(on):], skip_special_tokens=False) == "<think>\n\n</think>\n\n"
    assert off[:len(on)] == on and len(off) == len(on) + 4
    assert on == chat.render(HELLO)  # thinking is Qwen3's default


@pytest.mark.parametrize("name,answer,expected", [
    ("qwen3", "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?",
     ("The user greets me.", "Hello! How can I help?")),
    ("r1-distill-llama", "Okay, a greeting.\n</think>\n\nHi there!", ("Okay, a greeting.", "Hi there!")),
    ("r1-distill-qwen", "Okay, a greeting.\n</think>\n\nHi there!", ("Okay, a greeting.", "Hi there!")),
])
def test_decoded_answers_keep_their_markers_and_split(folder, name, answer, expected):
    """The markers are added tokens that are not special: decoding (special tokens skipped) keeps them."""
    chat = chat_format(name, folder)
    ids = chat.tokenizer.encode(answer, add_special_tokens=False)
    assert chat.tokenizer.convert_tokens_to_ids("</think>") in ids
    thinking = chat.thinking(chat.render(HELLO, ON))
    assert thinking.split(chat.decode(ids)) == expected


@pytest.mark.parametrize("name", ["qwen2.5", "llama3.1", "phi4", "gemma3", "glm4-hf", "mistral-nemo"])
def test_models_that_do_not_reason_get_no_split(folder, name):
    chat = chat_format(name, folder)
    assert chat.reasoning is None and chat.thinking(chat.render(HELLO)) is None
