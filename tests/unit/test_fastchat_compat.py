"""One test per patch in workers/serving/fastchat_compat.py (the registration retry is proven with real
processes in test_worker.py)."""
from __future__ import annotations

import json

import pydantic
import pytest
from transformers import AutoTokenizer

from workers.serving import fastchat_compat

fastchat_compat.apply()

from fastchat.conversation import get_conv_template  # noqa: E402
from fastchat.model.model_adapter import get_conversation_template  # noqa: E402
from fastchat.protocol.openai_api_protocol import (  # noqa: E402
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    DeltaMessage,
)


def test_stream_chunk_json_accepts_ensure_ascii_under_pydantic2():
    chunk = ChatCompletionStreamResponse(
        model="m", choices=[ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(content="你好"), finish_reason=None)]
    )
    with pytest.raises(TypeError, match="dumps_kwargs"):  # the upstream bug this patch exists for
        pydantic.BaseModel.json(chunk, exclude_unset=True, ensure_ascii=False)
    text = chunk.json(exclude_unset=True, ensure_ascii=False)
    assert "你好" in text  # raw UTF-8, as ensure_ascii=False asks
    assert json.loads(text)["choices"][0]["delta"] == {"content": "你好"}


def test_apply_is_idempotent():
    fastchat_compat.apply()
    fastchat_compat.apply()
    assert get_conv_template("smollm2").name == "smollm2"


CHATS = {
    "single turn": [{"role": "user", "content": "What is 2+2?"}],
    "multi turn with system": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "用中文说你好"},
    ],
    "empty system prompt": [{"role": "system", "content": ""}, {"role": "user", "content": "x"}],
    "multi turn default system": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
    ],
}


def fastchat_prompt(model_path: str, messages: list[dict]) -> str:
    """Build the prompt the way FastChat's openai_api_server does."""
    conv = get_conversation_template(model_path)
    for m in messages:
        if m["role"] == "system":
            conv.set_system_message(m["content"])
        else:
            conv.append_message(conv.roles[0] if m["role"] == "user" else conv.roles[1], m["content"])
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.mark.parametrize("chat", CHATS.values(), ids=CHATS.keys())
def test_smollm2_template_is_byte_identical_to_tokenizer_template(embedded_model, chat):
    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert fastchat_prompt(str(embedded_model), chat) == expected


def test_smollm2_template_is_chosen_by_model_path_and_stops_on_im_end(embedded_model):
    conv = get_conversation_template(str(embedded_model))
    assert conv.name == "smollm2"
    assert conv.stop_str == "<|im_end|>" and 2 in conv.stop_token_ids


def test_length_finish_counts_every_generated_token(embedded_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastchat.model.model_adapter import get_generate_stream_function

    model = AutoModelForCausalLM.from_pretrained(embedded_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    stream = get_generate_stream_function(model, str(embedded_model))
    params = {"prompt": "One, two, three,", "temperature": 0, "max_new_tokens": 3, "echo": False}
    *_, last = stream(model, tokenizer, params, "cpu", 8192)
    assert last["finish_reason"] == "length"
    assert last["usage"]["completion_tokens"] == 3  # upstream reports 2
    assert len(tokenizer(last["text"], add_special_tokens=False).input_ids) == 3
