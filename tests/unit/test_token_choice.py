"""The one token chooser (engine/token_choice.py): logprobs of the raw logits, bias, masks, per-job seeded draws;
and on SmolLM2, a seeded sampled answer with logprobs is the same in the continuous batch beside three others as
through generate() alone, its logprobs the model's own log-softmax."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import run_together
from tests.unit.test_batching import served
from workers.engine.generate import Job
from workers.engine.token_choice import ChosenTokenProcessor, TokenChooser, prompt_logprobs

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
IDS = torch.tensor([[0, 1]])


def job(**kw) -> Job:
    base = dict(prompt_ids=[0, 1], max_new_tokens=4, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    return Job(**{**base, **kw})


def test_greedy_choice_records_the_raw_log_softmax_and_the_top_tokens():
    j = job(logprobs=2, temperature=0.0)
    assert TokenChooser(j).choose(IDS, LOGITS) == 4
    raw = torch.log_softmax(LOGITS[0], dim=-1)
    (e,) = j.chosen_logprobs
    assert e.token == 4 and math.isclose(e.logprob, float(raw[4]), rel_tol=1e-6)
    assert [t for t, _ in e.top] == [4, 0] and math.isclose(e.top[1][1], float(raw[0]), rel_tol=1e-6)
    assert TokenChooser(job()).choose(IDS, LOGITS) == 4 and job().chosen_logprobs == []  # none asked: none kept


def test_logprobs_are_the_models_not_those_of_the_biased_tempered_distribution():
    j = job(logprobs=0, temperature=0.0, logit_bias={2: 100.0}, repetition_penalty=1.5)
    assert TokenChooser(j).choose(IDS, LOGITS) == 2  # the bias steers the choice ...
    assert math.isclose(j.chosen_logprobs[0].logprob, float(torch.log_softmax(LOGITS[0], -1)[2]), rel_tol=1e-6)
    assert j.chosen_logprobs[0].top == []  # ... the logprob stays the model's own
    assert TokenChooser(job(logit_bias={4: -100.0})).choose(IDS, LOGITS) == 0


def test_a_mask_hook_limits_the_choice():
    allowed = torch.full((1, 5), float("-inf"))
    allowed[0, 3] = 0.0
    seen = []
    j = job(logits_masks=(lambda ids: seen.append(ids) or allowed,))
    assert TokenChooser(j).choose(IDS, LOGITS) == 3 and seen == [[0, 1]]


def test_a_seed_repeats_its_draws_whatever_else_is_drawn_meanwhile():
    def draws(seed, interleave):
        chooser = TokenChooser(job(temperature=1.5, seed=seed))
        out = []
        for _ in range(30):
            out.append(chooser.choose(IDS, LOGITS))
            if interleave:
                torch.rand(7)  # the global generator, and another job's
                TokenChooser(job(temperature=1.0, seed=seed + 1)).choose(IDS, LOGITS)
        return out

    assert draws(5, False) == draws(5, True)
    assert len(set(draws(5, False))) > 1 and draws(5, False) != draws(6, False)


def test_generate_path_takes_the_choosers_token():
    j = job(temperature=0.0, logit_bias={1: 100.0})
    out = ChosenTokenProcessor(TokenChooser(j))(IDS, LOGITS.clone())
    assert int(out.argmax()) == 1 and torch.isinf(out).sum() == 4


def test_prompt_logprobs_score_each_token_after_the_ones_before():
    logits = torch.randn(3, 5)
    out = prompt_logprobs([4, 1, 3], logits, 1)
    assert out[0].token == 4 and out[0].logprob is None and out[0].top is None
    assert math.isclose(out[2].logprob, float(torch.log_softmax(logits[1], -1)[3]), rel_tol=1e-6)
    assert out[1].top[0][0] == int(logits[0].argmax())


@pytest.fixture(scope="module")
def smol(embedded_model):
    return served(embedded_model, prefix_tokens=0), served(embedded_model, batching=False, prefix_tokens=0)


def sampled(sm, i, **extra):
    messages = [{"role": "user", "content": ["Tell me a story.", "Name a colour.", "Count to five.", "Hi!"][i]}]
    return sm.job({"messages": messages, "temperature": 1.0, "max_new_tokens": 16, "logprobs": 2, **extra})[0]


def test_seeded_answers_and_logprobs_are_the_same_batched_and_alone(smol, embedded_model):
    from transformers import AutoModelForCausalLM

    batched, alone = smol
    jobs = [sampled(batched, i, seed=100 + i) for i in range(4)]
    together = run_together(batched, jobs)
    assert batched.engine.batcher.widest >= 3, "the requests did not decode together"
    again = [sampled(alone, i, seed=100 + i) for i in range(4)]
    for j, r, k in zip(jobs, together, again):
        assert r.text == alone.generate(k).text
        assert [e.token for e in j.chosen_logprobs] == [e.token for e in k.chosen_logprobs]
        for e, f in zip(j.chosen_logprobs, k.chosen_logprobs):
            assert abs(e.logprob - f.logprob) < 1e-3 and [t for t, _ in e.top] == [t for t, _ in f.top]
    # the logprobs are the fp32 model's own log-softmax of each position's logits
    model = AutoModelForCausalLM.from_pretrained(embedded_model, torch_dtype=torch.float32)
    j = jobs[0]
    tokens = [e.token for e in j.chosen_logprobs]
    with torch.inference_mode():
        logits = model(torch.tensor([j.prompt_ids + tokens])).logits[0].float()
    expected = torch.log_softmax(logits[len(j.prompt_ids) - 1:-1], dim=-1)
    for pos, e in enumerate(j.chosen_logprobs):
        assert abs(e.logprob - float(expected[pos, e.token])) < 1e-3


def test_logit_bias_steers_both_paths_alike(smol):
    batched, alone = smol
    greedy = [sm.generate(sampled(sm, 1, temperature=0)) for sm in smol]
    assert greedy[0].text == greedy[1].text
    token = batched.tokenizer.encode(" Purple")[0]
    for sm in smol:
        steered = sm.generate(sampled(sm, 1, temperature=0, max_new_tokens=3, logit_bias={str(token): 100}))
        assert steered.text.startswith("Purple") or steered.text.startswith(" Purple"), steered.text
