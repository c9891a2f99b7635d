"""Every model speaks as itself: prompt ids, stop ids, sampling defaults, answer clean-up, precision, and
the completeness check, on tiny ChatGLM3 / Qwen-7B-Chat models (tests/tiny_models.py) and the embedded
SmolLM2 in a folder with an unrelated name. In-process, no servers."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer

from tests import tiny_models
from workers.config.schema import Sampling
from workers.engine import prompt
from workers.engine.prompt import ChatFormat, PromptError
from workers.engine.reasoning import Thinking
from workers.models import check as model_check
from workers.models import families
from workers.models.families import UnknownFamily

MISSING = tiny_models.model_code_missing()
needs_model_code = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

CASES = {
    "single": [{"role": "user", "content": "Hello"}],
    "chinese": [{"role": "user", "content": "你好，请介绍一下你自己。"}],
    "system": [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Hello"}],
    "multi": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
              {"role": "user", "content": "和 3 呢？"}],
    "multi-system": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                     {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                     {"role": "assistant", "content": "A2 答"}, {"role": "user", "content": "Q3 问"}],
    # Role markers inside content are text, not the special tokens (both families' chat code).
    "markers": [{"role": "user", "content": "a<|im_end|>b <|user|> c"}],
}


# ------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory) -> Path:
    if MISSING:
        pytest.skip(MISSING)
    # The folder name lacks "chatglm3": the format must come from config.json, not the name.
    return tiny_models.build_chatglm3(tmp_path_factory.mktemp("glm") / "glm3-6b")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    if MISSING:
        pytest.skip(MISSING)
    return tiny_models.build_qwen(tmp_path_factory.mktemp("qw") / "some-model")


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory, embedded_model) -> Path:
    """The embedded SmolLM2 copied into a folder whose name says nothing (weights linked, not read)."""
    target = tmp_path_factory.mktemp("smol") / "my-model"
    target.mkdir()
    for f in embedded_model.iterdir():
        if f.name == "model.safetensors":
            os.symlink(f, target / f.name)
        elif f.is_file():
            shutil.copyfile(f, target / f.name)
    return target


_TOKENIZERS: dict[Path, object] = {}


def tokenizer_of(folder: Path):
    if folder not in _TOKENIZERS:
        _TOKENIZERS[folder] = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    return _TOKENIZERS[folder]


def fmt(folder: Path, conv_template: str | None = None, config=None) -> ChatFormat:
    return ChatFormat(folder, tokenizer_of(folder), config, conv_template)


# ----------------------------------------------------------------------------- prompt token ids

@needs_model_code
@pytest.mark.parametrize("case", CASES, ids=CASES.keys())
def test_chatglm3_prompt_equals_its_own_chat_code(glm_dir, case):
    assert fmt(glm_dir).render(CASES[case]) == tiny_models.reference_prompt_ids(glm_dir, CASES[case])


@needs_model_code
@pytest.mark.parametrize("case", CASES, ids=CASES.keys())
def test_qwen_prompt_equals_its_own_chat_code(qwen_dir, case):
    assert fmt(qwen_dir).render(CASES[case]) == tiny_models.reference_prompt_ids(qwen_dir, CASES[case])


@needs_model_code
def test_chatglm3_folder_named_glm3_6b_renders_via_build_chat_input(glm_dir):
    chat = fmt(glm_dir, config=AutoConfig.from_pretrained(glm_dir, trust_remote_code=True))
    assert glm_dir.name == "glm3-6b" and chat.kind == families.PROMPT_CHATGLM3 and chat.family is families.CHATGLM3
    ids = chat.render(CASES["single"])
    assert ids[:3] == [64790, 64792, 64795] and ids[-1] == 64796  # [gMASK] sop <|user|> ... <|assistant|>


@needs_model_code
def test_qwen_default_system_prompt_is_qwens(qwen_dir):
    chat = fmt(qwen_dir)
    assert chat.kind == families.PROMPT_QWEN_CHATML
    default = chat.render(CASES["single"])
    explicit = chat.render([{"role": "system", "content": "You are a helpful assistant."}, *CASES["single"]])
    assert default == explicit
    assert tokenizer_of(qwen_dir).decode(default).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")


@needs_model_code
def test_chatglm3_takes_any_role_order(glm_dir):
    messages = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"},
                {"role": "system", "content": "late system"}, {"role": "user", "content": "three"}]
    assert fmt(glm_dir).render(messages) == tiny_models.reference_prompt_ids(glm_dir, messages)


@needs_model_code
def test_qwen_history_window_drops_oldest_pairs_like_make_context(qwen_dir, tmp_path):
    small = tmp_path / "qwen-window"
    small.mkdir()
    for f in qwen_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copyfile(f, small / f.name)
    gen = json.loads((small / "generation_config.json").read_text())
    (small / "generation_config.json").write_text(json.dumps({**gen, "max_window_size": 60}))
    messages = []
    for i in range(6):
        messages += [{"role": "user", "content": f"question number {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "last"})
    ids = ChatFormat(small, tokenizer_of(qwen_dir)).render(messages)
    assert ids == tiny_models.reference_prompt_ids(small, messages)
    full = fmt(qwen_dir).render(messages)
    assert len(ids) < 60 + 10 < len(full)  # pairs were dropped, the query kept


def test_smollm2_in_an_unrelated_folder_uses_its_chat_template(smol_dir):
    chat = fmt(smol_dir)
    assert chat.kind == families.PROMPT_CHAT_TEMPLATE and chat.family is families.CHAT_TEMPLATE
    tok = tokenizer_of(smol_dir)
    for messages in CASES.values():
        assert chat.render(messages) == tok.apply_chat_template(messages, add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(chat.render(CASES["single"]))


def test_a_qwen2_like_model_gets_its_own_templates_system_prompt(smol_dir):
    """model_type qwen2 is not Qwen-7B: its chat_template (and its default system prompt) is used."""
    tok = AutoTokenizer.from_pretrained(smol_dir)
    tok.chat_template = (
        "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\\n' }}{%- endif %}{%- for m in messages %}{%- if m.role != 'system' %}"
        "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    chat = ChatFormat(smol_dir, tok, {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "eos_token_id": 2})
    assert chat.kind == families.PROMPT_CHAT_TEMPLATE
    assert tok.decode(chat.render(CASES["single"])).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>")


# ------------------------------------------------------------------------------ family choice

def test_family_comes_from_config_keys_not_names():
    assert families.family_for_config({"model_type": "qwen"}) is families.QWEN
    assert families.family_for_config({"architectures": ["QWenLMHeadModel"]}) is families.QWEN
    assert families.family_for_config(
        {"auto_map": {"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}}) is families.CHATGLM3
    assert families.family_for_config({"auto_map": {"AutoModel": "org/repo--modeling_qwen.QWenLMHeadModel"}}) is families.QWEN
    for other in ({"model_type": "qwen2"}, {"model_type": "llama"}, {"_name_or_path": "THUDM/chatglm3-6b"}, {}):
        assert families.family_for_config(other) is None


class _Tok:
    def __init__(self, chat_template=None, build_chat_input=False):
        self.chat_template = chat_template
        if build_chat_input:
            self.build_chat_input = lambda *a, **k: None


def test_resolve_order():
    assert families.resolve({"model_type": "chatglm"}, _Tok(build_chat_input=True)) is families.CHATGLM3
    # ChatGLM3's code path wins over a chat_template its tokenizer may also carry: chat() ignores it.
    assert families.resolve({"model_type": "chatglm"}, _Tok("{{x}}", build_chat_input=True)) is families.CHATGLM3
    # Same model_type without build_chat_input (GLM-4 style): its chat template.
    assert families.resolve({"model_type": "chatglm"}, _Tok("{{x}}")) is families.CHAT_TEMPLATE
    assert families.resolve({"model_type": "qwen"}, _Tok("{{x}}")) is families.QWEN
    assert families.resolve({"model_type": "llama"}, _Tok("{{x}}")) is families.CHAT_TEMPLATE


def test_no_template_and_no_family_is_a_clear_error():
    with pytest.raises(UnknownFamily, match=r"model_type 'mystery'.*models\[\]\.conv_template"):
        families.resolve({"model_type": "mystery", "architectures": ["MysteryForCausalLM"]}, _Tok())
    with pytest.raises(UnknownFamily, match=r"model_type 'chatglm'.*conv_template"):  # ChatGLM2-like
        families.resolve({"model_type": "chatglm"}, _Tok())


def test_model_without_template_needs_conv_template_and_works_with_one(smol_dir):
    tok = AutoTokenizer.from_pretrained(smol_dir)
    tok.chat_template = None
    config = {"model_type": "mystery", "eos_token_id": 2}
    with pytest.raises(UnknownFamily, match="mystery"):
        ChatFormat(smol_dir, tok, config)
    from fastchat.conversation import get_conv_template

    chat = ChatFormat(smol_dir, tok, config, conv_template="vicuna_v1.1")
    conv = get_conv_template("vicuna_v1.1")
    conv.set_system_message("Be brief.")
    conv.append_message(conv.roles[0], "Q1")
    conv.append_message(conv.roles[1], "A1")
    conv.append_message(conv.roles[0], "Q2")
    conv.append_message(conv.roles[1], None)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert chat.render(messages) == tok(conv.get_prompt()).input_ids
    with pytest.raises(UnknownFamily, match="not a FastChat conversation template"):
        ChatFormat(smol_dir, tok, config, conv_template="no-such-template")


@needs_model_code
def test_conv_template_override_adds_its_stops(qwen_dir):
    chat = fmt(qwen_dir, conv_template="qwen-7b-chat")
    assert chat.kind == "fastchat:qwen-7b-chat"
    assert chat.stop_strings == ("<|endoftext|>",)
    assert {151643, 151644, 151645} <= chat.stop_token_ids
    # FastChat's qwen-7b-chat template gives the ids of Qwen's own make_context.
    assert chat.render(CASES["system"]) == tiny_models.reference_prompt_ids(qwen_dir, CASES["system"])


# ------------------------------------------------------------------------------- bad messages

BAD = {
    "empty": ([], "non-empty list"),
    "not-a-list": ("hello", "non-empty list"),
    "ends-with-assistant": ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                            "last message must be from the user"),
    "unknown-role": ([{"role": "developer", "content": "x"}, {"role": "user", "content": "a"}],
                     r"messages\[0\]\.role 'developer'"),
    "tool-result-without-call": ([{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}],
                                 r"messages\[1\] is a tool result, but no assistant message with tool_calls"),
    "content-not-text": ([{"role": "user", "content": 5}], r"messages\[0\]\.content must be a string"),
    "image-part": ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text parts"),
}


@needs_model_code
@pytest.mark.parametrize("case", BAD, ids=BAD.keys())
def test_bad_messages_are_a_prompt_error(glm_dir, qwen_dir, smol_dir, case):
    messages, message = BAD[case]
    for folder in (glm_dir, qwen_dir, smol_dir):
        with pytest.raises(PromptError, match=message):
            fmt(folder).render(messages)
    assert issubclass(PromptError, ValueError)


@needs_model_code
def test_qwen_cannot_express_every_order(qwen_dir):
    chat = fmt(qwen_dir)
    with pytest.raises(PromptError, match=r"messages\[1\] is 'user'"):
        chat.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(PromptError, match="system"):
        chat.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "system", "content": "s"}, {"role": "user", "content": "c"}])


def test_text_content_parts_are_joined(smol_dir):
    chat = fmt(smol_dir)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    assert chat.render(parts) == chat.render(CASES["single"])


def test_a_template_that_refuses_is_a_prompt_error(smol_dir):
    tok = AutoTokenizer.from_pretrained(smol_dir)
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(PromptError, match="roles must alternate"):
        ChatFormat(smol_dir, tok).render(CASES["single"])


# -------------------------------------------------------------------------------------- stops

@needs_model_code
def test_stop_ids(glm_dir, qwen_dir, smol_dir):
    assert fmt(glm_dir).stop_token_ids == frozenset({2, 64795, 64797})            # </s> <|user|> <|observation|>
    assert fmt(qwen_dir).stop_token_ids == frozenset({151643, 151644, 151645})    # <|endoftext|> <|im_start|> <|im_end|>
    assert fmt(smol_dir).stop_token_ids == frozenset({2})                         # <|im_end|> (eos)
    assert tiny_models.TURN_END_ID[tiny_models.CHATGLM3] in fmt(glm_dir).stop_token_ids
    assert tiny_models.TURN_END_ID[tiny_models.QWEN] in fmt(qwen_dir).stop_token_ids
    assert set(tiny_models.CHATGLM3_STOPS) == fmt(glm_dir).stop_token_ids
    assert set(tiny_models.QWEN_STOPS) == fmt(qwen_dir).stop_token_ids


def test_eos_lists_from_both_configs_and_template_turn_ends(smol_dir, tmp_path):
    folder = tmp_path / "eos-lists"
    shutil.copytree(smol_dir, folder, symlinks=True)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = AutoTokenizer.from_pretrained(folder)
    config = {"model_type": "llama", "eos_token_id": [2, 7]}
    assert ChatFormat(folder, tok, config).stop_token_ids == frozenset({0, 2, 7})
    # A turn-end token the template writes is a stop even when no config names it (<|endoftext|> is id 0).
    tok.chat_template = "{% for m in messages %}{{ m.content }}<|endoftext|>{% endfor %}"
    assert 0 in ChatFormat(folder, tok, {"model_type": "llama", "eos_token_id": 2}).stop_token_ids


def test_token_id_ignores_unknown_tokens(smol_dir):
    assert prompt.token_id(tokenizer_of(smol_dir), "<|im_end|>") == 2
    assert prompt.token_id(tokenizer_of(smol_dir), "<|no-such-token|>") is None


# ------------------------------------------------------------------------------- plain text

@needs_model_code
def test_encode_text(glm_dir, qwen_dir, smol_dir):
    assert fmt(glm_dir).encode_text("Hello")[:2] == [64790, 64792]                 # ChatGLM3 needs [gMASK] sop
    assert fmt(qwen_dir).encode_text("Hello") == tokenizer_of(qwen_dir).encode("Hello") == [9707]
    smol = fmt(smol_dir)
    assert smol.encode_text("Hello") == tokenizer_of(smol_dir).encode("Hello")
    assert smol.encode_text("Hello")[0] != 1                                      # its bos is <|im_start|>: not added
    with pytest.raises(PromptError, match="empty"):
        fmt(qwen_dir).encode_text("")


def test_encode_text_adds_bos_when_the_template_writes_one(smol_dir):
    tok = AutoTokenizer.from_pretrained(smol_dir)
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"
    ids = ChatFormat(smol_dir, tok).encode_text("Hello")
    assert ids == [tok.bos_token_id] + tok.encode("Hello")
    assert ChatFormat(smol_dir, tok).encode_text(tok.bos_token + "Hello").count(tok.bos_token_id) == 1


# ---------------------------------------------------------------------------- decode and post-processing

@needs_model_code
def test_decode_as_chat_does(glm_dir, qwen_dir, smol_dir):
    qwen = fmt(qwen_dir)
    # chat() keeps Qwen's <|extra_N|> tokens; ids past the tokenizer's 151,851 tokens (the model has 151,936
    # rows) would make tiktoken panic and are dropped.
    assert qwen.decode([9707, 151646, 504, 151900]) == "Hello<|extra_0|> from"
    assert qwen.decode([15722]) == tokenizer_of(qwen_dir).decode([15722])
    glm = fmt(glm_dir)
    assert glm.decode([679, 3370, 348, 64796, 3370]) == tokenizer_of(glm_dir).decode([679, 3370, 348, 64796, 3370])
    assert "<|assistant|>" in glm.decode([679, 64796, 3370])  # process_response splits on it
    assert glm.decode([679, 64900]) == tokenizer_of(glm_dir).decode([679])
    smol = fmt(smol_dir)
    assert smol.decode([2, *tokenizer_of(smol_dir).encode("Hi")]) == "Hi"  # special tokens skipped


@needs_model_code
def test_decode_skips_only_transformers_own_id_conversion(glm_dir, qwen_dir, smol_dir):
    """Each streamed token decodes the answer so far: where the tokenizer's decode() is transformers' own, ChatFormat
    calls the _decode() behind it (decode() first converts each id, which was slow), with the same text; a tokenizer
    that brings its own decode() keeps it."""
    ids = {smol_dir: [2, *tokenizer_of(smol_dir).encode(" café, 你好 ```x``` ")], glm_dir: [679, 3370, 348, 64796],
           qwen_dir: [9707, 151646, 504, 15722]}
    for folder, answer in ids.items():
        chat = fmt(folder)
        assert chat._decode_ints == chat.tokenizer._decode
        skip = chat.family is None or chat.family.decode_skip_special_tokens
        assert chat.decode(answer) == chat.tokenizer.decode(answer, skip_special_tokens=skip)

    class OwnDecode(type(tokenizer_of(smol_dir))):
        def decode(self, token_ids, **kwargs):
            return "own:" + super().decode(token_ids, **kwargs)

    tok = tokenizer_of(smol_dir)
    own = OwnDecode.from_pretrained(smol_dir)
    assert ChatFormat(smol_dir, own).decode(tok.encode("Hi")) == "own:Hi"



@pytest.mark.parametrize("raw, expected", [
    ("\n  Hi [[训练时间]] there \n", "Hi 2023年 there"),   # ChatGLM3 answers start with "\n" (empty metadata)
    (" [[训练时间]] ", "2023年"),
    ("\n Hello", "Hello"),
    ("first<|assistant|>\n second ", "second"),
    # A first line that is not empty is metadata: chat() returns a dict; the text stays as it was.
    ("get_weather\n```python\ntool_call(city='x')\n```", "get_weather\n```python\ntool_call(city='x')\n```"),
    ("Hi [[训练时间]]\nthere ", "Hi [[训练时间]]\nthere "),
])
def test_chatglm3_postprocess(raw, expected):
    assert families.chatglm3_process_response(raw) == expected


@needs_model_code
def test_postprocess_per_family(glm_dir, qwen_dir, smol_dir):
    assert fmt(glm_dir).postprocess(" 你好[[训练时间]] ") == "你好2023年"
    assert fmt(qwen_dir).postprocess("  hi \n") == "hi"
    assert fmt(smol_dir).postprocess("  hi \n") == "  hi \n"
    assert fmt(qwen_dir, conv_template="qwen-7b-chat").postprocess("  hi ") == "  hi "


# ---------------------------------------------------------------------------------- sampling

@needs_model_code
def test_sampling_defaults_come_from_the_model(glm_dir, qwen_dir, smol_dir):
    assert prompt.sampling_defaults(qwen_dir) == {"temperature": 1.0, "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1}
    # ChatGLM3 ships no generation_config.json; its chat() passes temperature 0.8, top_p 0.8 itself.
    assert prompt.sampling_defaults(glm_dir) == {"temperature": 0.8, "top_p": 0.8, "top_k": -1, "repetition_penalty": 1.0}
    assert prompt.sampling_defaults(smol_dir) == families.NEUTRAL_SAMPLING


@needs_model_code
def test_conf_sampling_overrides_field_by_field(qwen_dir, glm_dir):
    got = prompt.sampling_defaults(qwen_dir, Sampling(temperature=0.3, repetition_penalty=1.0))
    assert got == {"temperature": 0.3, "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.0}
    assert prompt.sampling_defaults(glm_dir, {"top_p": 0.5, "top_k": 40})["top_p"] == 0.5
    assert prompt.sampling_defaults(glm_dir, Sampling(temperature=0))["temperature"] == 0.0


def test_sampling_keeps_do_sample_false_values(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6, "top_p": 0.9}))
    got = prompt.sampling_defaults(tmp_path)
    assert (got["temperature"], got["top_p"]) == (0.6, 0.9)


@needs_model_code
def test_max_new_tokens_default(qwen_dir, glm_dir, tmp_path):
    assert prompt.max_new_tokens_default(qwen_dir) == 512
    assert prompt.max_new_tokens_default(qwen_dir, 64) == 64
    assert prompt.max_new_tokens_default(glm_dir) == 512
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 77}))
    assert prompt.max_new_tokens_default(tmp_path) == 77
    assert prompt.max_new_tokens_default(tmp_path, 5) == 5


@needs_model_code
def test_context_length(glm_dir, qwen_dir, smol_dir):
    assert prompt.context_length(json.loads((glm_dir / "config.json").read_text())) == 8192      # seq_length
    assert prompt.context_length(AutoConfig.from_pretrained(qwen_dir, trust_remote_code=True)) == 8192
    assert prompt.context_length(json.loads((smol_dir / "config.json").read_text())) == 8192
    assert prompt.context_length({"seq_length": 32768}) == 32768
    assert prompt.context_length({"n_positions": 1024}) == 1024
    assert prompt.context_length({"text_config": {"max_position_embeddings": 4096}}) == 4096
    assert prompt.context_length({}) == 2048


# --------------------------------------------------------------------------------- precision

def floating_dtypes(model) -> dict:
    return {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point()}


@needs_model_code
@pytest.mark.parametrize("family", ["chatglm3", "qwen"])
@pytest.mark.parametrize("backend, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_backend_dtype_is_every_parameters_dtype(glm_dir, qwen_dir, family, backend, dtype, caplog):
    from workers.engine.loader import load_model

    folder = glm_dir if family == "chatglm3" else qwen_dir
    with caplog.at_level(logging.WARNING, logger="loader"):
        model, _ = load_model(folder, backend, trust_remote_code=True)
    params = floating_dtypes(model)
    assert params and set(params.values()) == {dtype}, {n: d for n, d in params.items() if d != dtype}
    # The family's config overrides did it, not the loader's safety-net cast.
    assert "casting them" not in caplog.text


@needs_model_code
def test_cpu_overrides_set_the_familys_precision_switch(glm_dir, qwen_dir):
    glm = families.prepare_cpu_config(glm_dir, True, torch.float32)
    assert glm.torch_dtype == torch.float32
    assert families.prepare_cpu_config(glm_dir, True).torch_dtype in ("float16", torch.float16)  # checkpoint dtype kept
    qwen = families.prepare_cpu_config(qwen_dir, True, torch.bfloat16)
    assert (qwen.fp32, qwen.bf16, qwen.fp16, qwen.use_flash_attn) == (False, True, False, False)
    qwen = families.prepare_cpu_config(qwen_dir, True)
    assert (qwen.fp32, qwen.bf16, qwen.fp16, qwen.use_flash_attn) == (True, False, False, False)


@needs_model_code
def test_chatglm3_postprocess_matches_its_process_response(glm_dir):
    model, _ = tiny_models.load_reference(glm_dir)
    for text in ("\n  Hi [[训练时间]] there \n", " \n Hello", "first<|assistant|>\n second ", "x<|assistant|>y", "",
                 " [[训练时间]] "):
        assert families.chatglm3_process_response(text) == model.process_response(text, [])[0]
    named = model.process_response("name\ncontent", [])[0]   # non-empty metadata: a dict, not text
    assert named == {"name": "name", "content": "content"}
    assert families.chatglm3_process_response("name\ncontent") == "name\ncontent"


# ------------------------------------------------------------------------------ completeness

def linked_copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target, copy_function=os.link)
    return target


@needs_model_code
def test_tiny_folders_are_complete(glm_dir, qwen_dir):
    assert model_check.problems(glm_dir) == []
    assert model_check.problems(qwen_dir) == []


@needs_model_code
def test_check_names_local_modules_qwen_code_imports(qwen_dir, tmp_path):
    folder = linked_copy(qwen_dir, tmp_path / "qwen-incomplete")
    (folder / "qwen_generation_utils.py").unlink()
    (folder / "cpp_kernels.py").unlink()
    assert model_check.problems(folder) == [
        "remote-code file cpp_kernels.py is missing (imported by modeling_qwen.py)",
        "remote-code file qwen_generation_utils.py is missing (imported by modeling_qwen.py)",
    ]


def synthetic_folder(root: Path, code: dict[str, str]) -> Path:
    root.mkdir()
    config = {"model_type": "custom", "auto_map": {"AutoModelForCausalLM": "modeling_custom.CustomModel"}}
    (root / "config.json").write_text(json.dumps(config))
    (root / "tokenizer.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(root / "model.safetensors"))
    for name, text in code.items():
        (root / name).write_text(text)
    return root


def test_check_follows_imports_recursively(tmp_path):
    folder = synthetic_folder(tmp_path / "m", {
        "modeling_custom.py": "import os\nfrom .helper_a import f\nimport local_util\n",
        "helper_a.py": "def g():\n    try:\n        from .helper_b import h\n    except ImportError:\n        pass\n",
        "local_util.py": "from .deep import z\n",
    })
    assert model_check.problems(folder) == [
        "remote-code file deep.py is missing (imported by local_util.py)",
        "remote-code file helper_b.py is missing (imported by helper_a.py)",
    ]
    (folder / "helper_a.py").write_text("def broken(:\n")
    assert "remote-code file helper_a.py is not valid Python" in model_check.problems(folder)[0]


def test_check_uses_transformers_weight_names():
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    assert model_check.weight_file_names() == ((SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME),
                                               (SAFE_WEIGHTS_NAME, WEIGHTS_NAME))
    assert families.CHATGLM3.tokenizer_files == ("tokenizer.model", "tokenizer_config.json")
    assert families.QWEN.tokenizer_files == ("qwen.tiktoken", "tokenizer_config.json")


# ------------------------------------------------------------- the pieces together reproduce chat()

@pytest.fixture(scope="module")
def turn_end_dirs(tmp_path_factory) -> dict:
    if MISSING:
        pytest.skip(MISSING)
    root = tmp_path_factory.mktemp("te")
    return {"chatglm3": tiny_models.build_chatglm3(root / "glm-te3", turn_end_after=3),
            "qwen": tiny_models.build_qwen(root / "qwen-te3", turn_end_after=3)}


_LOADED: dict[Path, tuple] = {}


@pytest.fixture(scope="module", autouse=True)
def free_loaded():
    yield
    _TOKENIZERS.clear()  # the reference models and tokenizers: not kept for the rest of the session
    _LOADED.clear()


def loaded(folder: Path):
    if folder not in _LOADED:
        _LOADED[folder] = tiny_models.load_reference(folder)
    return _LOADED[folder]


def reference_chat(folder: Path, messages, max_new_tokens: int) -> dict:
    model, tokenizer = loaded(folder)
    return tiny_models.chat_with_model(model, tokenizer, messages, max_new_tokens=max_new_tokens)


def greedy_answer(folder: Path, messages, max_new_tokens: int) -> tuple[str, list[int], bool]:
    """render -> generate (stop ids as eos, greedy) -> cut at the stop -> decode -> postprocess."""
    model, tokenizer = loaded(folder)
    chat = ChatFormat(folder, tokenizer)
    ids = chat.render(messages)
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(chat.stop_token_ids),
                         pad_token_id=min(chat.stop_token_ids), repetition_penalty=1.0)[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(out) if t in chat.stop_token_ids), None)
    answer = out if cut is None else out[:cut]
    return chat.postprocess(chat.decode(answer)), answer, cut is not None


@needs_model_code
@pytest.mark.parametrize("family", ["chatglm3", "qwen"])
@pytest.mark.parametrize("case", ["single", "chinese", "multi-system"])
def test_render_stop_decode_postprocess_reproduce_chat(glm_dir, qwen_dir, turn_end_dirs, family, case):
    messages = CASES[case]
    # Random weights, stopped by length: the text of all max_new_tokens tokens (chat() itself drops the last).
    folder = glm_dir if family == "chatglm3" else qwen_dir
    ref = reference_chat(folder, messages, max_new_tokens=10)
    text, ids, stopped = greedy_answer(folder, messages, 10)
    assert (ids, stopped) == (ref["output_ids"], ref["stopped_by"] != "length")
    assert text == ref["full_text"]
    # A model whose answer ends with the family's turn-end token: stops there, text equals chat()'s.
    folder = turn_end_dirs[family]
    ref = reference_chat(folder, messages, max_new_tokens=8)
    text, ids, stopped = greedy_answer(folder, messages, 8)
    assert ref["stopped_by"] == "turn_end" and stopped
    assert ids == ref["output_ids"] == tiny_models.chain_token_ids(folder, 3)
    assert text == ref["text"]


# ------------------------------------------------------------------ chat_template_kwargs, thinking

# The generation-prompt endings of Qwen3's and the DeepSeek-R1 distills' own chat templates.
QWEN3_TAIL = ("{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
              "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
              "{%- endif %}{%- endif %}")
R1_TAIL = "{%- if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{%- endif %}"
TURNS = "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"


def thinking_format(smol_dir, tail: str, model_type: str) -> ChatFormat:
    tok = AutoTokenizer.from_pretrained(smol_dir)
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = TURNS + tail
    return ChatFormat(smol_dir, tok, {"model_type": model_type, "eos_token_id": 2})


def test_chat_template_kwargs_reach_the_template(smol_dir):
    chat = thinking_format(smol_dir, QWEN3_TAIL, "qwen3")
    off = chat.render(CASES["single"], {"enable_thinking": False})
    assert chat.tokenizer.decode(off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chat.tokenizer.decode(chat.render(CASES["single"], {"enable_thinking": True})).endswith("assistant\n")
    assert chat.render(CASES["single"], {"unused_by_the_template": 1}) == chat.render(CASES["single"])
    assert chat.thinking(off) == Thinking("<think>", "</think>", opened_by_prompt=False)
    assert chat.thinking(chat.render(CASES["single"])).opened_by_prompt is False


def test_a_template_that_opens_the_thinking_block(smol_dir):
    chat = thinking_format(smol_dir, R1_TAIL, "qwen2")
    assert chat.reasoning is families.REASONING_MARKERS[0]
    assert chat.thinking(chat.render(CASES["single"])) == Thinking("<think>", "</think>", opened_by_prompt=True)


def test_models_without_thinking_markers_split_nothing(smol_dir):
    assert fmt(smol_dir).reasoning is None and fmt(smol_dir).thinking(fmt(smol_dir).render(CASES["single"])) is None


def test_formats_without_a_template_ignore_template_kwargs(glm_dir):
    assert fmt(glm_dir).render(CASES["single"], {"enable_thinking": False}) == fmt(glm_dir).render(CASES["single"])


@pytest.mark.parametrize("value,fragment", [
    ("enable_thinking=false", "must be an object"), ([1], "must be an object"),
    ({"add_generation_prompt": False}, "may not set add_generation_prompt"),
    ({"messages": [], "bos_token": "x"}, "may not set bos_token, messages"),
])
def test_bad_chat_template_kwargs_are_a_prompt_error_naming_the_field(smol_dir, value, fragment):
    with pytest.raises(PromptError, match=fragment) as caught:
        fmt(smol_dir).render(CASES["single"], value)
    assert caught.value.param == "chat_template_kwargs"
