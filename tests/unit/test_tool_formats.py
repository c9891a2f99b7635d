"""Each family's tool protocol (workers/engine/tool_formats.py): parsers on real-format outputs (malformed ones
come back as text), the prompts that offer tools, and the grammar of a forced call on every sampling path."""
from __future__ import annotations

import json

import pytest

from workers.engine import tool_formats as tf
from workers.models.families import TOOLS_CHATGLM3, TOOLS_HERMES, TOOLS_LLAMA3_JSON, TOOLS_QWEN_REACT

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"]}}
TOOLS = [WEATHER, {"name": "get_time", "description": "", "parameters": {"type": "object", "properties": {}}}]


def calls(fmt, text):
    content, found = tf.parse(fmt, text, TOOLS)
    return content, [(c.name, json.loads(c.arguments)) for c in found]


# --- parsers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,text,want", [
    # Qwen2.5 / Hermes: one call, parallel calls, text before a call, an unterminated last tag
    (TOOLS_HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     ("", [("get_weather", {"city": "Paris"})])),
    (TOOLS_HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                   '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     ("", [("get_weather", {"city": "Paris"}), ("get_time", {})])),
    (TOOLS_HERMES, 'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": "{}"}\n</tool_call>',
     ("Let me check.", [("get_time", {})])),
    (TOOLS_HERMES, '<tool_call>\n{"name": "get_time", "arguments": {}}', ("", [("get_time", {})])),
    # Llama 3.1: the whole answer is the call
    (TOOLS_LLAMA3_JSON, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}',
     ("", [("get_weather", {"city": "Oslo"})])),
    (TOOLS_LLAMA3_JSON, '{"name": "get_time", "parameters": {}}', ("", [("get_time", {})])),
    # ChatGLM3: metadata line, then its code block (Python keyword arguments, JSON literals too)
    (TOOLS_CHATGLM3, 'get_weather\n ```python\ntool_call(city="北京")\n```', ("", [("get_weather", {"city": "北京"})])),
    (TOOLS_CHATGLM3, "get_weather\n ```python\ntool_call(city='Paris', days=3, metric=True, extra=null)\n```",
     ("", [("get_weather", {"city": "Paris", "days": 3, "metric": True, "extra": None})])),
    # Qwen-7B-Chat ReAct: thought, action and its JSON input; a final answer is text
    (TOOLS_QWEN_REACT, 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}',
     ("I need the weather.", [("get_weather", {"city": "Paris"})])),
    (TOOLS_QWEN_REACT, 'Action: get_time\nAction Input: {}\nObservation:', ("", [("get_time", {})])),
    (TOOLS_QWEN_REACT, "Thought: I now know the final answer\nFinal Answer: It is sunny.", ("It is sunny.", [])),
])
def test_real_format_calls_are_read(fmt, text, want):
    assert calls(fmt, text) == want


@pytest.mark.parametrize("fmt,text", [
    (TOOLS_HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'),   # bad JSON
    (TOOLS_HERMES, '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>'),      # unknown tool
    (TOOLS_HERMES, '<tool_call>\n{"name": "get_time", "arguments": [1, 2]}\n</tool_call>'),       # not an object
    (TOOLS_HERMES, "Just a plain answer."),
    (TOOLS_LLAMA3_JSON, '{"name": "get_weather", "parameters": {"city": "Oslo"'),
    (TOOLS_LLAMA3_JSON, "The weather is fine."),
    (TOOLS_CHATGLM3, "get_weather\n ```python\ntool_call(city=\n```"),
    (TOOLS_CHATGLM3, "get_weather\n ```python\ntool_call(__import__('os'))\n```"),
    (TOOLS_CHATGLM3, "get_weather\n ```python\ntool_call(city=open('x'))\n```"),
    (TOOLS_CHATGLM3, "unknown_tool\n ```python\ntool_call(city='x')\n```"),
    (TOOLS_QWEN_REACT, "Thought: hmm\nAction: get_weather\nAction Input: Paris"),
    (TOOLS_QWEN_REACT, 'Action: fly\nAction Input: {"to": "Mars"}'),
])
def test_malformed_calls_come_back_as_text(fmt, text):
    assert calls(fmt, text) == (text, [])


# --- prompts ---------------------------------------------------------------------------------------------------
CALLED = [{"role": "user", "content": "Weather in Paris?"},
          {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "get_weather",
                                                               "arguments": '{"city": "Paris"}'}]},
          {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]


def test_chatglm3_turns_put_tools_in_the_system_item_and_results_in_an_observation():
    history, query, role = tf.chatglm3_turns(CALLED, TOOLS)
    assert history[0] == {"role": "system", "content": tf.CHATGLM3_TOOLS_SYSTEM, "tools": TOOLS}
    assert history[2] == {"role": "assistant", "metadata": "get_weather",
                          "content": '```python\ntool_call(city="Paris")\n```'}
    assert (query, role) == ("sunny", "observation")


def test_qwen_react_turns_follow_qwens_openai_api():
    system, pairs, question, open_answer = tf.qwen_react_turns(CALLED, TOOLS, "You are a helpful assistant.")
    assert system == "You are a helpful assistant." and pairs == []
    assert question.startswith("Answer the following questions as best you can.")
    assert question.endswith("Begin!\n\nQuestion: Weather in Paris?") and "[get_weather, get_time]" in question
    assert open_answer == 'Thought: \nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: sunny\nThought:'
    _, _, q2, open2 = tf.qwen_react_turns(CALLED[:1], TOOLS, "s")
    assert open2 is None and q2.endswith("Question: Weather in Paris?")


def test_a_template_without_tools_gets_hermes_system_prompt_and_tags():
    out = tf.template_messages(CALLED, TOOLS, takes_tools=False)
    assert out[0]["role"] == "system" and "<tools>" in out[0]["content"] and '"get_time"' in out[0]["content"]
    assert out[2] == {"role": "assistant",
                      "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}


def test_a_template_with_tools_gets_openai_shaped_messages():
    out = tf.template_messages(CALLED, TOOLS, takes_tools=True)
    assert out[1]["tool_calls"] == [{"id": "c1", "type": "function",
                                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert out[2]["role"] == "tool" and out[2]["tool_call_id"] == "c1"


@pytest.fixture(scope="module")
def hermes_folder(tmp_path_factory):
    from tests import tiny_qwen2

    return tiny_qwen2.build(tmp_path_factory.mktemp("hermes") / "model")


def test_qwen25_template_renders_tools_and_the_call_history(hermes_folder):
    from transformers import AutoTokenizer

    from tests import tiny_qwen2
    from workers.engine.prompt import ChatFormat

    tok = AutoTokenizer.from_pretrained(hermes_folder)
    assert tiny_qwen2.check_tokenizer(tok) == []   # encodes llama.cpp's Qwen2 test vectors exactly
    chat = ChatFormat(hermes_folder, tok)
    assert chat.tool_format == TOOLS_HERMES
    text = tok.decode(chat.render(CALLED, tools=TOOLS))
    assert "<tools>\n" in text and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")


# --- forced calls on every sampling path ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def hermes_model(hermes_folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return (AutoModelForCausalLM.from_pretrained(hermes_folder, torch_dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(hermes_folder), hermes_folder)


def forced_job(model, tok, folder, greedy=True):
    from workers.engine import generate
    from workers.engine.constraint import Grammars
    from workers.engine.prompt import ChatFormat

    chat = ChatFormat(folder, tok)
    ids = chat.render(CALLED[:1], tools=TOOLS)
    job = generate.Job(prompt_ids=ids, max_new_tokens=60, temperature=0 if greedy else 1.0, top_p=1.0, top_k=0,
                       repetition_penalty=1.0, stop_token_ids=chat.stop_token_ids)
    constraint = Grammars(tok, model.config.vocab_size).constraint(
        tf.call_grammar(chat.tool_format, TOOLS, "get_weather"), job.stop_token_ids)
    job.logits_masks += (constraint.as_mask(len(ids)),)  # as ServedModel.job does
    return chat, job


@pytest.mark.parametrize("greedy", [True, False])
def test_forced_call_through_generate_parses(hermes_model, greedy):
    from workers.engine import generate

    model, tok, folder = hermes_model
    chat, job = forced_job(model, tok, folder, greedy)
    result = generate.run(model, chat.decode, chat.postprocess, job)
    assert result.finish_reason == "stop", result
    content, found = tf.parse(TOOLS_HERMES, result.text, TOOLS)
    assert [c.name for c in found] == ["get_weather"] and len(json.loads(found[0].arguments)["city"]) <= 12


def test_forced_call_through_the_batch_sampling_step_parses(hermes_model):
    import torch

    from workers.engine.sequence import Sequence

    model, tok, folder = hermes_model
    chat, job = forced_job(model, tok, folder)
    seq = Sequence.start(job, None, chat.decode, chat.postprocess)
    with torch.inference_mode():
        done = False
        while not done:
            logits = model(torch.tensor([seq.tokens])).logits[:, -1, :]
            done = seq.emit(logits)
    result = seq.finish()
    _, found = tf.parse(TOOLS_HERMES, result.text, TOOLS)
    assert result.finish_reason == "stop" and [c.name for c in found] == ["get_weather"], result.text
