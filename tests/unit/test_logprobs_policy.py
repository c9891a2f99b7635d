"""logprobs, logit_bias and seed in the API's input rules, and the OpenAI shapes built from the worker's entries."""
from __future__ import annotations

import pytest

from tests.unit.test_api_policy import chat, completion, refused
from workers.serving import api_policy as policy


def entry(token: str, logprob, top=()):
    return {"id": 1, "token": token, "bytes": list(token.encode()), "logprob": logprob,
            "top": None if logprob is None else [{"id": 2, "token": t, "bytes": list(t.encode()), "logprob": lp}
                                                 for t, lp in top]}


def test_chat_logprobs_top_logprobs_bias_and_seed_make_the_plan_and_the_worker_payload():
    plan = chat(logprobs=True, top_logprobs=3, logit_bias={"42": -100, " 7": 5.5}, seed=-3)
    assert plan.logprobs == 3 and plan.sampling.logit_bias == {"42": -100.0, "7": 5.5} and plan.sampling.seed == -3
    assert chat(logprobs=True).logprobs == 0
    assert chat().logprobs is None and chat(logprobs=False, top_logprobs=0).logprobs is None
    payload = policy.worker_payload("m", plan.sampling, max_new_tokens=4, request_id="r", messages=[],
                                    logprobs=plan.logprobs)
    assert (payload["logprobs"], payload.get("prompt_logprobs"), payload["logit_bias"], payload["seed"]) == \
        (3, None, {"42": -100.0, "7": 5.5}, -3)
    second = policy.worker_payload("m", plan.sampling, max_new_tokens=4, request_id="r", messages=[], choice=1)
    assert second["seed"] == -2 and "logprobs" not in second  # the next of n answers: the next seed


def test_completion_logprobs_are_0_to_5():
    assert completion(logprobs=5, echo=True).logprobs == 5 and completion(logprobs=0).logprobs == 0
    assert completion().logprobs is None
    err = refused(completion, logprobs=6)
    assert err.param == "logprobs" and "maximum of 5" in err.message


@pytest.mark.parametrize("body,param,fragment", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "maximum of 20"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "minimum of 0"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "maximum of 100"),
    ({"logit_bias": {"5": "big"}}, "logit_bias", "a number"),
    ({"logit_bias": [1, 2]}, "logit_bias", ""),
    ({"seed": 1.5}, "seed", ""),
    ({"seed": 2**64}, "seed", "out of range"),
])
def test_bad_logprob_bias_and_seed_values_are_400_naming_the_parameter(body, param, fragment):
    err = refused(chat, **body)
    assert err.param == param and fragment in err.message, err.message


def test_chat_logprobs_shape():
    out = policy.chat_logprobs([entry("Hi", -0.5, [("Hi", -0.5), ("Hello", -1.5)]), entry("!", -0.1)])
    assert out == {"content": [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [
            {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}, {"token": "Hello", "logprob": -1.5,
                                                                  "bytes": list(b"Hello")}]},
        {"token": "!", "logprob": -0.1, "bytes": [33], "top_logprobs": []}]}


def test_completion_logprobs_shape_continues_offsets_and_adds_the_chosen_token():
    built = policy.CompletionLogprobs()
    prompt = built.part([entry("Once", None), entry(" upon", -2.0, [(" upon", -2.0)])])
    answer = built.part([entry(" a", -0.3, [(" the", -0.2)])])
    assert prompt == {"tokens": ["Once", " upon"], "token_logprobs": [None, -2.0],
                      "top_logprobs": [None, {" upon": -2.0}], "text_offset": [0, 4]}
    assert answer == {"tokens": [" a"], "token_logprobs": [-0.3], "top_logprobs": [{" the": -0.2, " a": -0.3}],
                      "text_offset": [9]}
