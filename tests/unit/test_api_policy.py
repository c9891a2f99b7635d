"""The API's input rules and error table as pure functions (workers/serving/api_policy.py, errors.py): no server."""
from __future__ import annotations

import asyncio
import json
import math

import pytest

from workers.engine.sampling_limits import LIMITS
from workers.serving import api_policy as policy
from workers.serving import errors
from workers.serving.errors import ApiError

USER = [{"role": "user", "content": "hi"}]


def chat(**body):
    return policy.chat_request({"model": "m", "messages": USER, **body})


def completion(**body):
    return policy.completion_request({"model": "m", "prompt": "p", **body})


def refused(fn, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert 400 <= err.status < 500, err.status
    return err


# --- the error table and envelope ----------------------------------------------------------------------------
def test_every_table_entry_has_a_status_type_and_code():
    assert errors.TABLE and all(k.status in (400, 401, 404, 405, 413, 429, 500, 502, 503) for k in errors.TABLE.values())
    assert {k.code for k in errors.TABLE.values()} == set(errors.TABLE)
    assert errors.MODEL_NOT_FOUND.status == 404 and errors.QUEUE_FULL.status == 429


def test_envelope_is_openai_shaped_and_keeps_fastchat_top_level_fields():
    err = ApiError(errors.INVALID_VALUE, "bad temperature", "temperature")
    body = err.body()
    assert body["error"] == {"message": "bad temperature", "type": "invalid_request_error", "param": "temperature",
                             "code": "invalid_value"}
    assert body["object"] == "error" and body["message"] == "bad temperature" and body["code"] == "invalid_value"
    response = err.response()
    assert response.status_code == 400 and json.loads(response.body) == body
    event = err.sse()
    assert event.startswith("data: ") and json.loads(event[6:])["error"]["message"] == "bad temperature"


def test_429_always_carries_retry_after():
    assert ApiError(errors.QUEUE_FULL, "full").response().headers["retry-after"] == str(errors.DEFAULT_RETRY_AFTER_S)
    assert ApiError(errors.QUEUE_FULL, "full", headers={"Retry-After": "7"}).headers["Retry-After"] == "7"


def test_worker_unavailable_and_busy_have_distinct_wording():
    down = errors.unavailable("http://127.0.0.1:21002/worker_generate_stream", ConnectionRefusedError())
    assert down.status == 503 and down.type == "worker_unavailable"
    assert down.message == ("the model worker or controller at http://127.0.0.1:21002 stopped answering "
                            "(ConnectionRefusedError); it may be restarting - retry in a few seconds")
    busy = errors.busy("smol-int8", 301.4, 20)
    assert busy.status == 503 and busy.type == "worker_busy"
    assert busy.message.startswith("model smol-int8 is busy: waited 301 s for a slot")
    assert "stopped answering" not in busy.message and "restarting" not in busy.message
    assert "stopped answering" in errors.not_registered("x").message


@pytest.mark.parametrize("status,body,headers,kind,message", [
    (400, {"error": {"message": "prompt too long", "type": "invalid_request_error", "code": "context_length_exceeded"}},
     {}, errors.CONTEXT_LENGTH_EXCEEDED, "prompt too long"),
    (429, {"error": {"message": "queue full (16 waiting)", "type": "rate_limit_error", "code": "queue_full"}},
     {"retry-after": "5"}, errors.QUEUE_FULL, "queue full (16 waiting)"),
    (503, {"error": {"message": "model m is busy: waited 300 s for a slot", "type": "worker_busy", "code": "worker_busy"}},
     {}, errors.WORKER_BUSY, "model m is busy: waited 300 s for a slot"),
    (503, {"error": {"message": "shutting down", "type": "worker_unavailable", "code": "worker_unavailable"}},
     {}, errors.WORKER_UNAVAILABLE, "shutting down"),
    (500, b"Internal Server Error", {}, errors.WORKER_ERROR, "answered HTTP 500"),
    (500, {"error": {"message": "the worker failed: IndexError: x", "type": "internal_error", "code": 500}},
     {}, errors.WORKER_ERROR, "the worker failed: IndexError"),
    # the bundle's worker (workers/serving/worker.py): code = the status, plus FastChat's text/error_code
    (429, {"error": {"message": "model m is overloaded: 16 requests are already waiting; retry after 3 s",
                     "type": "rate_limit_exceeded", "param": None, "code": 429}, "text": "x", "error_code": 429},
     {"Retry-After": "3"}, errors.QUEUE_FULL, "overloaded"),
    (503, {"error": {"message": "model m is busy: waited 300 s for a slot (all 4 slots stayed taken)",
                     "type": "worker_busy", "param": None, "code": 503}}, {}, errors.WORKER_BUSY, "is busy"),
    (400, {"error": {"message": "top_p=0.0 is out of range", "type": "invalid_request_error", "param": "top_p",
                     "code": 400}}, {}, errors.INVALID_VALUE, "top_p=0.0"),
])
def test_worker_http_errors_keep_their_status_and_words(status, body, headers, kind, message):
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    err = errors.from_worker_http(status, raw, headers, "http://w:1/worker_generate_stream")
    assert err.kind is kind and message in err.message
    assert err.status == kind.status and err.type == kind.type  # type and code: from the one table
    if status == 429:
        assert err.headers["Retry-After"] in ("5", "3")
    code = body["error"]["code"] if isinstance(body, dict) else None
    assert err.code == (code if code in errors.TABLE and errors.TABLE[code].status == status else kind.code)
    if isinstance(body, dict) and body["error"].get("param"):
        assert err.param == body["error"]["param"]


def test_fastchat_in_band_error_codes_map_to_the_table():
    assert errors.from_worker_chunk(40001, "bad ids").status == 400
    assert errors.from_worker_chunk(40303, "too long").kind is errors.CONTEXT_LENGTH_EXCEEDED
    assert errors.from_worker_chunk(42901, "slow down").status == 429
    assert errors.from_worker_chunk(50001, "boom").kind is errors.WORKER_ERROR


def test_validation_errors_name_the_field():
    err = errors.from_validation([{"type": "float_parsing", "loc": ("body", "temperature"), "msg": "Input should be a "
                                   "valid number", "input": "hot"}])
    assert err.param == "temperature" and "temperature" in err.message and "'hot'" in err.message
    err = errors.from_validation([{"type": "string_type", "loc": ("messages", 0, "content", "str"), "msg": "x"}])
    assert err.param == "messages[0].content"
    err = errors.from_validation([{"type": "missing", "loc": ("body", "model"), "msg": "Field required"}])
    assert err.kind is errors.MISSING_PARAMETER and err.param == "model"
    assert errors.from_validation([{"type": "json_invalid", "loc": ("body", 5), "msg": "JSON decode error",
                                    "ctx": {"error": "Expecting value"}}]).kind is errors.INVALID_JSON


def test_short_repr_is_bounded_even_for_deep_input():
    deep = []
    for _ in range(10000):
        deep = [deep]
    assert len(errors.short(deep)) < 100 and len(errors.short("x" * 10**6)) < 100


# --- JSON body --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,fragment", [
    (b"", "empty"), (b"   ", "empty"), (b'{"model": "x", "messages": [', "not valid JSON"), (b"[1, 2]", "JSON object"),
    (b'"text"', "JSON object"), (b'{"temperature": NaN}', "NaN"), (b'{"t": Infinity}', "Infinity"),
    (b"\xff\xfe{", "JSON"), (b"[" * 100000 + b"]" * 100000, "nested"),
    (b'{"messages": [{"content": "a\\ud800b"}]}', "surrogate"), (b'{"\\udfff": 1}', "surrogate"),
])
def test_bodies_that_are_not_a_json_object(raw, fragment):
    err = refused(policy.parse_json, raw)
    assert err.kind is errors.INVALID_JSON and fragment in err.message


def test_a_json_object_parses():
    assert policy.parse_json(b'{"model": "m"}') == {"model": "m"}
    assert policy.parse_json(b'{"c": "\\ud83d\\ude00"}') == {"c": "\U0001F600"}  # an escaped pair is fine


# --- messages ---------------------------------------------------------------------------------------------------
def test_string_messages_are_refused():
    err = refused(chat, messages="What is the capital of France?")
    assert err.param == "messages" and "not a string" in err.message


@pytest.mark.parametrize("messages,param,fragment", [
    ([], "messages", "at least one message"),
    (123, "messages", "must be a list"),
    (None, "messages", "must be a list"),
    ([{"role": "user"}], "messages[0].content", "messages[0] has no 'content'"),
    (["hi"], "messages[0]", "must be an object"),
    ([{"role": "robot", "content": "hi"}], "messages[0].role", "must be one of system, user, assistant"),
    ([{"role": "developer", "content": "42"}], "messages[0].role", "'developer'"),
    ([{"content": "hi"}], "messages[0].role", "None"),
    ([{"role": ["user"], "content": "hi"}], "messages[0].role", "must be one of"),
    ([{"role": "user", "content": None}], "messages[0].content", "a string or a list of content parts"),
    ([{"role": "user", "content": 5}], "messages[0].content", "a string or a list of content parts"),
    ([{"role": "user", "content": []}], "messages[0].content", "must not be an empty list"),
    ([{"role": "user", "content": ["hi"]}], "messages[0].content[0]", "content part"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text", "must be a string"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text", "must be a string"),
    ([{"role": "user", "content": [{"type": "video", "text": "x"}]}], "messages[0].content[0].type", "must be 'text'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
     "messages[1].tool_calls[0]", "must be"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": {"id": "1"}}],
     "messages[1].tool_calls", "must be a list"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None,
                                         "function_call": {"name": "f", "arguments": {"x": 1}}}],
     "messages[1].function_call", "a JSON string"),
])
def test_bad_messages_name_the_problem(messages, param, fragment):
    err = refused(chat, messages=messages)
    assert err.param == param and fragment in err.message, (err.param, err.message)


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "file", "file": {"file_id": "f"}},
])
def test_non_text_content_parts_are_not_supported(part):
    err = refused(chat, messages=[{"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}])
    assert err.kind is errors.UNSUPPORTED_CONTENT and err.param == "messages[0].content[1]"
    assert "not supported" in err.message and part["type"] in err.message


def test_text_parts_are_joined_and_other_fields_dropped():
    plan = chat(messages=[
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": ""}])
    assert plan.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello\nthere"},
                             {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": ""}]


# --- parameters -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,value", [
    ("audio", {"voice": "x"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
])
def test_unsupported_chat_parameters_are_400_naming_them(name, value):
    err = refused(chat, **{name: value})
    assert err.kind is errors.UNSUPPORTED_PARAMETER and err.param == name and name in err.message


@pytest.mark.parametrize("body", [
    {"tools": None}, {"tools": []}, {"tool_choice": "none"}, {"tool_choice": "auto"}, {"response_format": {"type": "text"}},
    {"logit_bias": {}}, {"seed": None}, {"logprobs": False}, {"top_logprobs": 0}, {"modalities": ["text"]},
    {"user": "u-1"}, {"parallel_tool_calls": False}, {"some_future_field": 1},
])
def test_parameters_that_ask_for_nothing_are_accepted(body):
    plan, plain = chat(**body), chat()
    assert (plan.messages, plan.sampling, plan.n, plan.stream) == (plain.messages, plain.sampling, plain.n, plain.stream)


@pytest.mark.parametrize("name,value", [("suffix", "end"), ("best_of", 3), ("use_beam_search", True)])
def test_unsupported_completion_parameters(name, value):
    err = refused(completion, **{name: value})
    assert err.kind is errors.UNSUPPORTED_PARAMETER and err.param == name


def test_unsupported_embedding_parameters():
    err = refused(policy.embeddings_request, {"model": "m", "input": "x", "dimensions": 8})
    assert err.param == "dimensions"
    err = refused(policy.embeddings_request, {"model": "m", "input": "x", "encoding_format": "int8"})
    assert err.param == "encoding_format"


@pytest.mark.parametrize("body,param,fragment", [
    ({"temperature": 5}, "temperature", "5 is greater than the maximum of 2 - 'temperature'"),
    ({"temperature": -1}, "temperature", "less than the minimum of 0"),
    ({"temperature": "hot"}, "temperature", "valid number"),
    ({"top_p": 1.5}, "top_p", "'top_p'"),
    ({"top_k": -2}, "top_k", "-2 is less than the minimum of -1 - 'top_k'"),
    ({"n": 100}, "n", "100 is greater than the maximum of 8 - 'n'"),
    ({"n": 0}, "n", "'n'"),
    ({"n": 2.5}, "n", "integer"),
    ({"max_tokens": -5}, "max_tokens", "-5 is less than the minimum of 1 - 'max_tokens'"),
    ({"max_tokens": 0}, "max_tokens", "'max_tokens'"),
    ({"max_tokens": "many"}, "max_tokens", "integer"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "'max_completion_tokens'"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "give one of them"),
    ({"presence_penalty": 2.5}, "presence_penalty", "maximum of 2"),
    ({"frequency_penalty": -3}, "frequency_penalty", "minimum of -2"),
    ({"repetition_penalty": 0}, "repetition_penalty", "less than the minimum of 0.001"),
    ({"repetition_penalty": 11}, "repetition_penalty", "maximum of 10"),
    ({"stop": 5}, "stop", "stop"),
    ({"stop": [""]}, "stop[0]", "must not be an empty string"),
    ({"stop": ["a"] * 17}, "stop", "at most 16"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"stream_options": "yes", "stream": True}, "stream_options", "stream_options"),
    ({"model": None}, "model", "required"),
    ({"model": 7}, "model", "string"),
])
def test_bad_parameters_name_the_field(body, param, fragment):
    err = refused(chat, **body)
    assert err.param == param and fragment in err.message, (err.param, err.message)


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_the_api_takes_each_sampling_value_the_worker_takes(name):
    """One table (workers/engine/sampling_limits.py): its ends pass, top_k 0 (off) included, and just past them is 400."""
    low, high = LIMITS[name]
    assert getattr(chat(**{name: low}).sampling, name) == low
    assert getattr(chat(**{name: high}).sampling, name) == high
    assert refused(chat, **{name: high + 1}).param == name
    if name == "top_k":
        assert chat(top_k=0).sampling.top_k == 0


def test_nan_never_passes_a_range_check():
    with pytest.raises(ApiError):
        policy.check_range("temperature", math.nan, 0, 2)


def test_fields_the_client_leaves_out_are_null_so_the_worker_applies_the_model_defaults():
    s = chat().sampling
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens, s.presence_penalty, s.frequency_penalty,
            s.repetition_penalty, s.stop) == (None, None, None, None, None, None, None, [])
    s = chat(temperature=None, top_p=None, max_tokens=None).sampling
    assert (s.temperature, s.top_p, s.max_tokens) == (None, None, None)


def test_given_fields_pass_through():
    plan = chat(temperature=0, top_p=0.9, top_k=40, max_tokens=7, presence_penalty=1.5, frequency_penalty=-0.5,
                repetition_penalty=1.1, stop="END", n=2)
    s = plan.sampling
    assert (s.temperature, s.top_p, s.top_k, s.max_tokens, s.presence_penalty, s.frequency_penalty,
            s.repetition_penalty, s.stop, plan.n) == (0, 0.9, 40, 7, 1.5, -0.5, 1.1, ["END"], 2)


def test_max_completion_tokens_is_max_tokens():
    assert chat(max_completion_tokens=9).sampling.max_tokens == 9
    assert chat(max_completion_tokens=9, max_tokens=9).sampling.max_tokens == 9


def test_chat_template_kwargs_reach_the_worker():
    plan = chat(chat_template_kwargs={"enable_thinking": False})
    assert plan.template_kwargs == {"enable_thinking": False}
    payload = policy.worker_payload("m", plan.sampling, max_new_tokens=None, request_id="r", messages=plan.messages,
                                    template_kwargs=plan.template_kwargs)
    assert payload["chat_template_kwargs"] == {"enable_thinking": False}
    assert chat().template_kwargs == {} and chat(chat_template_kwargs=None).template_kwargs == {}
    assert "chat_template_kwargs" not in policy.worker_payload("m", chat().sampling, max_new_tokens=None,
                                                               request_id="r", messages=USER)


@pytest.mark.parametrize("value", ["enable_thinking=false", [{"enable_thinking": False}], 1, True])
def test_chat_template_kwargs_must_be_an_object(value):
    err = refused(chat, chat_template_kwargs=value)
    assert err.status == 400 and err.param == "chat_template_kwargs"


def test_include_usage():
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=True, stream_options={"include_usage": False}).include_usage
    assert not chat(stream=True).include_usage


# --- prompts and embedding inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt,expected", [
    ("Once upon", ["Once upon"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1, 2], [3]], [[1, 2], [3]]),
    (["a", [5, 6]], ["a", [5, 6]]),
])
def test_prompt_shapes(prompt, expected):
    assert completion(prompt=prompt).prompts == expected


@pytest.mark.parametrize("prompt,param,fragment", [
    ([{}], "prompt[0]", "a string or a list of token ids"), ([None], "prompt[0]", "a string or a list of token ids"),
    ([], "prompt", "must not be empty"), ("", "prompt", "must not be empty"), ([""], "prompt[0]", "must not be empty"),
    ([[]], "prompt[0]", "must not be empty"), ({"text": "x"}, "prompt", "a list of token ids"), (None, "prompt", "prompt"),
    (5, "prompt", "prompt"), ([1, "a"], "prompt[1]", "token id"), ([1, -2], "prompt[1]", "out of range"),
    ([[1, 2.5]], "prompt[0][1]", "token id"), ([True, False], "prompt[0]", "got True"), ([1, 2**40], "prompt[1]", "out of range"),
])
def test_bad_prompts_name_the_problem(prompt, param, fragment):
    err = refused(completion, prompt=prompt)
    assert err.param == param and fragment in err.message, (err.param, err.message)


def test_missing_prompt_and_too_many_completions():
    assert refused(policy.completion_request, {"model": "m"}).kind is errors.MISSING_PARAMETER
    err = refused(completion, prompt=["a"] * 5, n=4)
    assert "at most 16" in err.message


def test_completion_defaults_and_echo():
    plan = completion()
    assert plan.sampling.max_tokens is None and not plan.echo and plan.n == 1
    assert completion(echo=True).echo
    err = refused(completion, echo=True, prompt=[1, 2])  # the API echoes text; it cannot decode ids
    assert err.param == "echo" and "token-id" in err.message


@pytest.mark.parametrize("value,expected", [
    ("hello", ["hello"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_embedding_input_shapes(value, expected):
    assert policy.embeddings_request({"model": "m", "input": value}).inputs == expected


@pytest.mark.parametrize("value", [[], "", [""], [{}], [None], [[]], None, 3])
def test_bad_embedding_inputs(value):
    assert refused(policy.embeddings_request, {"model": "m", "input": value}).param.startswith("input")


def test_embedding_model_from_the_path_and_limits():
    assert policy.embeddings_request({"input": "x"}, model_from_path="m").model == "m"
    assert refused(policy.embeddings_request, {"input": "x"}).kind is errors.MISSING_PARAMETER
    assert "at most" in refused(policy.embeddings_request, {"model": "m", "input": ["x"] * 300}).message


# --- context and models ------------------------------------------------------------------------------------------
def test_max_new_tokens_against_the_context():
    assert policy.max_new_tokens(None, 8192, 100, "m") is None  # the worker's default
    assert policy.max_new_tokens(50, 8192, 100, "m") == 50
    assert policy.max_new_tokens(None, 8192, 8180, "m", default=16) == 12
    err = refused(policy.max_new_tokens, 10**9, 8192, 100, "m")
    assert "max_tokens=1000000000 is too large for model m" in err.message and "at most 8092 tokens" in err.message
    err = refused(policy.max_new_tokens, None, 8192, 9000, "m")
    assert err.kind is errors.CONTEXT_LENGTH_EXCEEDED and "maximum context length is 8192" in err.message


def test_unknown_model_is_404_listing_the_served_ones():
    err = policy.unknown_model("gpt-9", ["b", "a"])
    assert err.status == 404 and err.param == "model" and "available models: a, b" in err.message
    assert "none" in policy.unknown_model("x", []).message


# --- the worker's side --------------------------------------------------------------------------------------------
def test_worker_payload_follows_the_contract():
    s = chat(temperature=0, stop=["x"]).sampling
    p = policy.worker_payload("m", s, max_new_tokens=None, request_id="r-0", messages=USER, prompt="<p>")
    assert p == {"model": "m", "temperature": 0, "top_p": None, "top_k": None, "repetition_penalty": None,
                 "presence_penalty": None, "frequency_penalty": None, "max_new_tokens": None, "stop": ["x"],
                 "stop_token_ids": [], "echo": False, "request_id": "r-0", "messages": USER, "prompt": "<p>"}
    p = policy.worker_payload("m", s, max_new_tokens=4, request_id="r", prompt_token_ids=[1, 2])
    assert p["prompt_token_ids"] == [1, 2] and "prompt" not in p and p["echo"] is False


def test_fastchat_prompt_from_a_template():
    import dataclasses

    from fastchat.conversation import get_conv_template

    conv = dataclasses.asdict(get_conv_template("qwen-7b-chat"))  # ChatML
    conv["sep_style"] = int(conv["sep_style"])
    prompt = policy.fastchat_prompt(conv, [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_text_deltas_hold_back_an_incomplete_character():
    d = policy.TextDeltas()
    assert d.feed("He") == "He"
    assert d.feed("Hello \ufffd") == "llo "
    assert d.feed("Hello 你") == "你"
    assert d.feed("Hello 你") == ""
    assert d.feed("Hello 你\ufffd", final=True) == "\ufffd"  # the answer really ends with it: sent as is


def test_usage_counts_each_prompt_once_whatever_n():
    u = policy.Usage()
    for _ in range(3):  # n=3 answers to one prompt
        u.add(0, {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14})
    u.add(1, {"prompt_tokens": 5, "completion_tokens": 2})
    u.add(1, None)
    assert u.as_dict() == {"prompt_tokens": 15, "completion_tokens": 14, "total_tokens": 29}


def test_stream_chunks_carry_object_and_created():
    c = policy.chat_chunk("id", 123, "m", 0, {"content": "x"}, include_usage=True)
    assert c["object"] == "chat.completion.chunk" and c["created"] == 123 and c["usage"] is None
    c = policy.completion_chunk("id", 123, "m", 2, "x", "length")
    assert c["object"] == "text_completion" and c["choices"][0] == {"index": 2, "text": "x", "logprobs": None,
                                                                   "finish_reason": "length"}
    u = policy.usage_chunk("id", 1, "m", "chat.completion.chunk", policy.Usage())
    assert u["choices"] == [] and u["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert policy.finish_reason("length") == "length" and policy.finish_reason(None) == "stop"


def test_body_size_limit_answers_413_in_the_envelope():
    sent = []

    async def app(scope, receive, send):  # never reached
        raise AssertionError

    async def receive():
        return {"type": "http.request", "body": b"x" * 2000, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(policy.BodySizeLimit(app, limit=1000)({"type": "http", "headers": []}, receive, send))
    assert sent[0]["status"] == 413
    body = json.loads(sent[1]["body"])
    assert body["error"]["code"] == "request_too_large" and "exceeds the limit of 1000 bytes" in body["message"]


# --- the assembled app, without a controller or worker ------------------------------------------------------------
@pytest.fixture(scope="module")
def api():
    """FastChat's openai_api_server app as api_server.install makes it, with keys, and no controller behind it."""
    import aiohttp
    from fastapi.testclient import TestClient

    from workers.serving import api_server, fastchat_compat

    fastchat_api = fastchat_compat.apply_api(aiohttp, 3.0)
    api_server.install(fastchat_api)
    fastchat_api.app_settings.controller_address = "http://127.0.0.1:9"  # nothing listens there
    fastchat_api.app_settings.api_keys = ["sk-unit"]
    with TestClient(fastchat_api.app, raise_server_exceptions=False) as client:
        yield {"client": client, "module": fastchat_api, "headers": {"Authorization": "Bearer sk-unit"}}
    fastchat_api.app_settings.api_keys = None


OPEN_ROUTES = {"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def unguarded_routes(app, api_module) -> list[str]:
    """Routes that answer without the API-key check, other than the open ones (health, metrics, docs)."""
    from fastapi.routing import APIRoute

    found = []
    for route in app.routes:
        path = getattr(route, "path", "")
        if path in OPEN_ROUTES:
            continue
        deps = [d.call for d in getattr(getattr(route, "dependant", None), "dependencies", [])]
        if not isinstance(route, APIRoute) or api_module.check_api_key not in deps:
            found.append(path)
    return found


def test_no_route_bypasses_the_api_key_check(api):
    from workers.serving import api_server

    app, module = api["module"].app, api["module"]
    assert unguarded_routes(app, module) == []
    paths = {getattr(r, "path", "") for r in app.routes}
    assert not [p for p in paths if p.startswith("/api/")], paths
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics"} <= paths
    for route in app.routes:  # the generation routes are the bundle's handlers, not FastChat's
        if getattr(route, "path", "") in api_server.REPLACED_ROUTES:
            assert type(route.endpoint.__self__).__name__ == "BundleApi"


def test_every_v1_route_needs_the_key_and_fastchat_api_v1_is_gone(api):
    client = api["client"]
    schema = client.get("/openapi.json").json()
    for path, methods in schema["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method in methods:
            r = client.request(method.upper(), path.replace("{model_name}", "m"), json={})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    for path in ("/api/v1/chat/completions", "/api/v1/token_check"):
        r = client.post(path, json={"model": "m", "messages": [{"role": "user"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_wrong_key_and_missing_key(api):
    client = api["client"]
    r = client.get("/v1/models")
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    r = client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong-ключ".encode()})
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"


def test_input_errors_come_before_the_controller_and_name_the_field(api):
    client, h = api["client"], api["headers"]
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": "hi"}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.post("/v1/chat/completions", content=b'{"model": "m", "messages": [', headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/completions", json={"model": "m", "prompt": [{}]}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[0]"
    r = client.post("/v1/embeddings", json={"model": "m", "input": [None]}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[0]"
    r = client.get("/v1/chat/completions", headers=h)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_controller_down_is_503_not_500(api):
    client, h = api["client"], api["headers"]
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": USER}, headers=h)
    assert r.status_code == 503 and "stopped answering" in r.json()["error"]["message"]
    r = client.get("/v1/models", headers=h)  # FastChat's own handler (fastchat_compat patch 5)
    assert r.status_code == 503 and "at http://127.0.0.1:9 stopped answering" in r.json()["error"]["message"]
    assert r.headers["retry-after"]
    r = client.get("/v1/models", headers=h)  # FastChat's own handler, through compat patch 4
    assert r.status_code == 503 and "stopped answering" in r.json()["message"]
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["controller"] == "not answering"


def test_metrics_need_no_key_and_count_requests(api):
    client = api["client"]
    client.post("/v1/chat/completions", json={"model": "m", "messages": "hi"}, headers=api["headers"])
    text = client.get("/metrics").text
    assert 'bundle_api_requests_total{endpoint="chat",model="unknown",status="400"}' in text
    assert "bundle_api_requests_in_flight" in text and "bundle_api_time_to_first_token_seconds" in text
