"""Splitting a reasoning model's answer into reasoning_content and content (workers/engine/reasoning.py),
streamed and not, on answers written the way Qwen3 and the DeepSeek-R1 distills write them."""
from __future__ import annotations

import re

import pytest

from workers.engine.reasoning import Thinking, opened_by_prompt, split
from workers.models import families
from workers.serving.api_policy import AnswerDeltas, message_fields

START, END = "<think>", "</think>"
QWEN3 = Thinking(START, END, opened_by_prompt=False)  # Qwen3's template leaves <think> to the model
R1 = Thinking(START, END, opened_by_prompt=True)      # the R1 distills' template ends with "<think>\n"

# (thinking, generated answer as the model writes it, reasoning_content, content)
CASES = {
    "qwen3 thinks": (QWEN3, "<think>\nThe user greets me. I greet back.\n</think>\n\nHello! How can I help?",
                     "The user greets me. I greet back.", "Hello! How can I help?"),
    "qwen3 enable_thinking false": (QWEN3, "Hello! How can I help?", "", "Hello! How can I help?"),
    "r1 distill": (R1, "Okay, 2+2 is 4.\n</think>\n\nThe answer is **4**.", "Okay, 2+2 is 4.", "The answer is **4**."),
    "r1 distill writes <think> itself too": (R1, "<think>\nhmm\n</think>\n\n4", "hmm", "4"),
    "cut by max_tokens while thinking": (QWEN3, "<think>\nFirst, let me consider", "First, let me consider", ""),
    "r1 cut by max_tokens": (R1, "Okay, so the user asks", "Okay, so the user asks", ""),
    "empty thinking": (QWEN3, "<think>\n\n</think>\n\nHi.", "", "Hi."),
    "marker later in the answer is content": (QWEN3, "Use <think> tags like <think>x</think>.", "",
                                              "Use <think> tags like <think>x</think>."),
    "leading white space before <think>": (QWEN3, "\n<think>a</think>b", "a", "b"),
    "only the first closing marker ends it": (R1, "a</think>b</think>c", "a", "b</think>c"),
    "chinese": (R1, "用户问好。\n</think>\n\n你好！", "用户问好。", "你好！"),
}


@pytest.mark.parametrize("name", CASES)
def test_answers_split_into_reasoning_and_content(name):
    thinking, answer, reasoning, content = CASES[name]
    assert thinking.split(answer) == (reasoning, content)


def test_the_text_has_its_markers_balanced_when_the_prompt_opened_them():
    assert R1.text("hmm\n</think>\n\n4") == "<think>hmm\n</think>\n\n4"
    assert QWEN3.text("<think>x</think>y") == "<think>x</think>y"


def tokens(answer: str) -> list[str]:
    """The answer as a model streams it: markers split across pieces ("</", "th", "ink", ">"), words,
    single characters; every cut that a tokenizer could make is covered by `every_cut` below."""
    return re.findall(r"</|<|th|ink>|>|\w+|\s|.", answer)


def stream_fields(thinking: Thinking, pieces: list[str]) -> tuple[str, str, list[str]]:
    """Feed the growing text as the worker does (final only at the end); concatenate the API's deltas."""
    deltas, got, order = AnswerDeltas(), {"reasoning_content": "", "content": ""}, []
    text = ""
    for i, piece in enumerate(pieces):
        text += piece
        final = i == len(pieces) - 1
        reasoning, content = thinking.split(text, final)
        for delta in deltas.feed({"text": thinking.text(text), "reasoning_content": reasoning, "content": content},
                                 final):
            (name, value), = delta.items()
            got[name] += value
            order.append(name)
    return got["reasoning_content"], got["content"], order


@pytest.mark.parametrize("name", CASES)
def test_streamed_deltas_add_up_to_the_answer_reasoning_first(name):
    thinking, answer, reasoning, content = CASES[name]
    got_reasoning, got_content, order = stream_fields(thinking, tokens(answer))
    assert (got_reasoning, got_content) == (reasoning, content)
    assert order == sorted(order, key=lambda n: n != "reasoning_content")  # all reasoning deltas come first


@pytest.mark.parametrize("name", ["qwen3 thinks", "r1 distill", "leading white space before <think>",
                                  "only the first closing marker ends it", "r1 distill writes <think> itself too",
                                  "cut by max_tokens while thinking"])
def test_every_cut_of_the_stream_is_a_prefix_of_the_answer(name):
    """Markers split anywhere (one character at a time): no marker text leaks into either field."""
    thinking, answer, reasoning, content = CASES[name]
    for cut in range(len(answer) + 1):
        r, c = thinking.split(answer[:cut], final=False)
        assert reasoning.startswith(r) and content.startswith(c), (cut, r, c)
    assert stream_fields(thinking, list(answer))[:2] == (reasoning, content)


def test_nothing_is_sent_while_the_opening_marker_may_still_come():
    assert split("", START, END, final=False) == (None, "")
    assert split("\n<thi", START, END, final=False) == (None, "")
    assert split("<thi", START, END, final=True) == (None, "<thi")  # it never came: content
    assert split("Hello", START, END, final=False) == (None, "Hello")


def test_a_chunk_that_adds_to_both_sends_the_reasoning_first():
    reasoning, content = R1.split("hmm\n</think>\n\n4")
    chunk = {"text": R1.text("hmm\n</think>\n\n4"), "reasoning_content": reasoning, "content": content}
    assert AnswerDeltas().feed(chunk, final=True) == [{"reasoning_content": "hmm"}, {"content": "4"}]


def test_a_model_without_markers_keeps_its_plain_content():
    assert message_fields({"text": "Hi"}) == {"content": "Hi"}
    assert message_fields({"text": "<think>x", "reasoning_content": "", "content": "Hi"}) == {
        "reasoning_content": None, "content": "Hi"}


# --- does the prompt open the thinking block? (ids as a tokenizer with <think>=1, </think>=2 gives them)
VOCAB = {"<think>": 1, "</think>": 2}


def encode(text: str) -> list[int]:
    return [VOCAB.get(piece, 100 + ord(piece[0])) for piece in re.findall(r"</?think>|.", text, re.S)]


def decode(ids: list[int]) -> str:
    back = {v: k for k, v in VOCAB.items()}
    return "".join(back.get(i) or chr(i - 100) for i in ids)


@pytest.mark.parametrize("prompt,opened", [
    ("<｜User｜>Hi<｜Assistant｜><think>\n", True),                       # R1 distill template
    ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),  # Qwen3, enable_thinking true
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),          # Qwen3, enable_thinking false
    ("<｜User｜>what is <think>?<｜Assistant｜>", False),                  # the marker in a user message
    ("<think>a</think><｜User｜>Hi<｜Assistant｜><think>\n", True),
])
def test_the_prompt_tells_whether_the_answer_starts_inside_the_thinking(prompt, opened):
    assert opened_by_prompt(encode(prompt), 1, 2, decode) is opened


def test_reasoning_markers_are_family_data_keyed_by_model_type_tokenizer_and_template():
    def has(text):
        return text in VOCAB

    r1_template = "{{'<｜Assistant｜><think>\\n'}}"
    assert families.reasoning_markers({"model_type": "qwen2"}, has, r1_template).start == START
    assert families.reasoning_markers({"model_type": "qwen3"}, has, "{{'<think>\\n\\n</think>'}}").end == END
    assert families.reasoning_markers({"model_type": "qwen2"}, has, "<|im_start|>assistant\n") is None  # Qwen2.5
    assert families.reasoning_markers({"model_type": "qwen2"}, lambda t: False, r1_template) is None
    assert families.reasoning_markers({"model_type": "chatglm"}, has, r1_template) is None
