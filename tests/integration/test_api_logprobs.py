"""logprobs, seed, logit_bias and plain completions, through the official openai client against the supervised
bundle (the shared served_bundle: the embedded SmolLM2 in INT8 on neural-speed and in fp32)."""
from __future__ import annotations

import concurrent.futures

import openai
import pytest
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

from tests.conftest import API_KEYS, SERVED_FP32, SERVED_INT8

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = "Once upon a time"
BYTE_ENCODER = bytes_to_unicode()


@pytest.fixture(scope="module")
def client(served_bundle) -> OpenAI:
    return OpenAI(base_url=served_bundle["api"], api_key=API_KEYS[0], max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def fp32(embedded_model):
    """The same fp32 model in this process, for the log-softmax the API's logprobs must equal."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    model = AutoModelForCausalLM.from_pretrained(embedded_model, torch_dtype=torch.float32).eval()
    return model, tokenizer


def token_id(tokenizer, raw: list[int]) -> int:
    """A SmolLM2 (byte-level BPE) token's id from the bytes the API gives."""
    return tokenizer.convert_tokens_to_ids("".join(BYTE_ENCODER[b] for b in raw))


def log_softmax_after(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab): the model's log-softmax of the next token after each position."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


# --- chat logprobs -----------------------------------------------------------------------------------------
def test_chat_logprobs_are_the_models_own_log_softmax(client, fp32):
    model, tokenizer = fp32
    r = client.chat.completions.create(model=SERVED_FP32, messages=QUESTION, temperature=0, max_tokens=10,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and "".join(c.token for c in content) == r.choices[0].message.content
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert len(prompt) == r.usage.prompt_tokens
    answer = [token_id(tokenizer, c.bytes) for c in content]
    expected = log_softmax_after(model, prompt + answer)[len(prompt) - 1:-1]
    for pos, c in enumerate(content):
        assert c.logprob == pytest.approx(float(expected[pos, answer[pos]]), abs=1e-3)
        top = torch.topk(expected[pos], 3)
        assert [token_id(tokenizer, t.bytes) for t in c.top_logprobs] == top.indices.tolist()
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert bytes(c.bytes).decode() == c.token


def test_no_logprobs_unless_asked(client):
    r = client.chat.completions.create(model=SERVED_INT8, messages=QUESTION, temperature=0, max_tokens=4)
    assert r.choices[0].logprobs is None
    r = client.completions.create(model=SERVED_FP32, prompt=STORY, temperature=0, max_tokens=4)
    assert r.choices[0].logprobs is None


@pytest.mark.parametrize("model", [SERVED_INT8, SERVED_FP32])
def test_streamed_chat_logprobs_are_the_non_streamed_ones(client, model):
    ask = dict(model=model, messages=QUESTION, temperature=0, max_tokens=16, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**ask).choices[0].logprobs.content
    streamed = [t for chunk in client.chat.completions.create(stream=True, **ask)
                if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.content]
    assert [(t.token, t.bytes, [x.token for x in t.top_logprobs]) for t in streamed] == \
        [(t.token, t.bytes, [x.token for x in t.top_logprobs]) for t in whole]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole], abs=1e-4)
    assert len(whole) >= 3


# --- completions logprobs ------------------------------------------------------------------------------------
def test_completion_logprobs_with_echo_score_the_prompt_too(client, fp32):
    model, tokenizer = fp32
    r = client.completions.create(model=SERVED_FP32, prompt=STORY, temperature=0, max_tokens=6, logprobs=2, echo=True)
    choice, lp = r.choices[0], r.choices[0].logprobs
    prompt = tokenizer(STORY, add_special_tokens=False).input_ids
    n = r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens == len(prompt) and choice.text.startswith(STORY)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing comes before the first token
    assert "".join(lp.tokens[:len(prompt)]) == STORY and lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    assert all(2 <= len(top) <= 3 and lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs) if i)
    expected = log_softmax_after(model, prompt)
    for pos in range(1, len(prompt)):
        assert lp.token_logprobs[pos] == pytest.approx(float(expected[pos - 1, prompt[pos]]), abs=1e-3)
    # streamed: the echoed prompt's chunk carries the prompt's logprobs, then each chunk its tokens'
    parts = [c.choices[0].logprobs for c in client.completions.create(
        model=SERVED_FP32, prompt=STORY, temperature=0, max_tokens=6, logprobs=2, echo=True, stream=True)
        if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset
    assert [x for p in parts for x in p.token_logprobs][1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)


def test_the_first_call_of_a_stock_fastchat_client_is_answered(client):
    """Its first call: /v1/completions with logprobs 1, on every served model (neural-speed INT8 included)."""
    for model in (SERVED_INT8, SERVED_FP32):
        r = client.completions.create(model=model, prompt=STORY, max_tokens=8, temperature=0, logprobs=1)
        lp = r.choices[0].logprobs
        assert r.choices[0].text and len(lp.tokens) == r.usage.completion_tokens
        assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    with pytest.raises(openai.BadRequestError) as info:  # neural-speed gives the last prompt position's logits only
        client.completions.create(model=SERVED_INT8, prompt=STORY, max_tokens=4, logprobs=1, echo=True)
    assert info.value.param == "echo" and "fp32" in info.value.message


# --- seed ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [SERVED_INT8, SERVED_FP32])
def test_a_seeded_sampled_answer_repeats_alone_and_beside_other_requests(client, model):
    ask = dict(model=model, messages=[{"role": "user", "content": "Tell me a short story about a cat."}],
               temperature=1.0, max_tokens=24, seed=1234)
    alone = client.chat.completions.create(**ask).choices[0].message.content
    assert client.chat.completions.create(**ask).choices[0].message.content == alone
    others = [{"role": "user", "content": f"Write a poem about the number {k}."} for k in range(3)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(client.chat.completions.create, model=model, messages=[m], temperature=1.0, max_tokens=64)
                for m in others]
        beside = pool.submit(client.chat.completions.create, **ask)
        texts = [f.result().choices[0].message.content for f in busy]
    assert beside.result().choices[0].message.content == alone
    assert all(texts)
    unseeded = {client.chat.completions.create(**{**ask, "seed": None}).choices[0].message.content for _ in range(2)}
    assert unseeded != {alone}  # without the seed the draws differ


# --- logit_bias ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [SERVED_INT8, SERVED_FP32])
def test_logit_bias_steers_a_greedy_answer_to_a_chosen_token(client, fp32, model):
    tokenizer = fp32[1]
    greedy = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=4)
    assert not greedy.choices[0].message.content.startswith("Berlin")
    berlin = tokenizer("Berlin", add_special_tokens=False).input_ids[0]
    steered = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=4,
                                             logit_bias={str(berlin): 100}, logprobs=True)
    assert steered.choices[0].message.content.startswith(tokenizer.decode([berlin]))
    assert steered.choices[0].logprobs.content[0].logprob < -1  # the model's own logprob, not the biased one


def test_logit_bias_with_a_token_the_model_lacks_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SERVED_FP32, messages=QUESTION, max_tokens=4, logit_bias={"60000": 5})
    assert info.value.param == "logit_bias" and "60000" in info.value.message


# --- plain completions on neural-speed ----------------------------------------------------------------------------
def test_a_plain_completion_on_the_int8_default_model_is_answered_close_to_fp32(client, fp32):
    """neural-speed's llama graph evaluates the prompt after the BOS token its check needs; each token of its greedy
    answer is among the fp32 model's (given the prompt alone, as the fp32 worker reads it) 5 most likely."""
    model, tokenizer = fp32
    r = client.completions.create(model=SERVED_INT8, prompt=STORY, max_tokens=16, temperature=0, logprobs=1)
    assert r.choices[0].text.strip() and r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 16
    prompt = tokenizer(STORY, add_special_tokens=False).input_ids
    answer = [token_id(tokenizer, list(t.encode())) for t in r.choices[0].logprobs.tokens]
    expected = log_softmax_after(model, prompt + answer)[len(prompt) - 1:-1]
    ranks = [int((expected[pos] > expected[pos, t]).sum()) for pos, t in enumerate(answer)]
    assert max(ranks) < 5, ranks
