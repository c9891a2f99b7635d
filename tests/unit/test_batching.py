"""Continuous batching: requests that arrive while others decode join the batch, and every answer is
token for token what the same request gets alone (greedy), on transformers' own Llama (SmolLM2, fp32
and ITREX INT8) and on the own code of ChatGLM3 and Qwen-7B (differently laid out caches; Qwen-7B takes its rotary
positions from the cache length, which the batch shifts back per row)."""
from __future__ import annotations

import threading

import pytest

from tests import tiny_models
from tests.helpers import freed, outcome, run_together
from workers.config.int8 import Int8Settings
from workers.config.schema import ModelSpec
from workers.engine.batcher import batch_axes
from workers.engine.loader import load_model
from workers.engine.served_model import ServedModel

QUESTIONS = ["Hi!", "Tell me about Paris in three sentences, please, with some detail about its history.",
             "What is 2+2?", "Write a short poem about the sea and the wind, in four lines."]


# INT8 here is the qbits runtime, which batches (a Llama's default, neural-speed, runs one at a time).
QBITS = Int8Settings(runtime="qbits")


def served(folder, backend="fp32", batching=True, trust=False, cache_root=None, prefix_tokens=2048) -> ServedModel:
    spec = ModelSpec(names=["m"], source={"path": str(folder)}, port=1, backend=backend, batching=batching,
                     trust_remote_code=trust, prefix_cache_tokens=prefix_tokens, int8=QBITS)
    model, tokenizer = load_model(folder, backend, int8=QBITS, trust_remote_code=trust, cache_root=cache_root)
    return ServedModel.build(spec, folder, model, tokenizer)


def job_for(sm: ServedModel, i: int, max_tokens: int, **extra):
    params = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "temperature": 0,
              "max_new_tokens": max_tokens + 3 * i, **extra}
    return sm.job(params)[0]


def assert_batched_equals_alone(folder, trust=False, backend="fp32", cache_root=None, extra=None, max_tokens=24):
    batched = served(folder, backend, trust=trust, cache_root=cache_root, prefix_tokens=0)
    alone = served(folder, backend, batching=False, trust=trust, cache_root=cache_root, prefix_tokens=0)
    assert batched.engine.batcher is not None and alone.engine.batcher is None
    extra = extra or [{}] * 4
    together = run_together(batched, [job_for(batched, i, max_tokens, **extra[i]) for i in range(4)])
    expected = [alone.generate(job_for(alone, i, max_tokens, **extra[i])) for i in range(4)]
    assert [outcome(r) for r in together] == [outcome(r) for r in expected]
    assert batched.engine.batcher.widest >= 3, "the requests did not decode together"
    assert batched.engine.batcher.active == 0


def test_smollm2_fp32_batched_answers_equal_answers_alone(embedded_model):
    # Also per-request processors inside one batch: a repetition penalty, presence/frequency penalties, a stop string.
    extra = [{}, {"repetition_penalty": 1.3}, {"presence_penalty": 1.5, "frequency_penalty": 0.5}, {"stop": [","]}]
    assert_batched_equals_alone(embedded_model, extra=extra)


def test_smollm2_int8_batched_answers_equal_answers_alone(embedded_model, qbits_entry, int8_cache_root):
    assert_batched_equals_alone(embedded_model, backend="itrex-int8", cache_root=int8_cache_root)


@pytest.mark.skipif(tiny_models.model_code_missing() is not None, reason=str(tiny_models.model_code_missing()))
def test_chatglm3_batched_answers_equal_answers_alone(tmp_path):
    folder = tiny_models.build_chatglm3(tmp_path / "model")
    assert_batched_equals_alone(folder, trust=True)


@pytest.mark.skipif(tiny_models.model_code_missing() is not None, reason=str(tiny_models.model_code_missing()))
def test_qwen_batched_answers_equal_answers_alone(tmp_path):
    """Qwen-7B's code takes rotary positions from the cache length: the batch shifts them back per row."""
    folder = tiny_models.build_qwen(tmp_path / "model")
    assert_batched_equals_alone(folder, trust=True)


def test_remote_code_without_a_family_of_its_own_is_not_batched():
    class RemoteModel:  # a model class from a folder's own code (module "transformers_modules....")
        pass

    RemoteModel.__module__ = "transformers_modules.some_model.modeling_some"
    assert batch_axes(None, RemoteModel()) is None


def test_a_cancelled_request_leaves_the_batch_and_the_others_answer_as_alone(embedded_model):
    batched = served(embedded_model, prefix_tokens=0)
    alone = served(embedded_model, batching=False, prefix_tokens=0)
    jobs = [job_for(batched, i, 40) for i in range(3)]
    threading.Timer(0.8, jobs[1].cancel.set).start()
    results = run_together(batched, jobs)
    assert results[1].finish_reason == "cancelled" and results[1].completion_tokens < jobs[1].max_new_tokens
    for i in (0, 2):
        assert outcome(results[i]) == outcome(alone.generate(job_for(alone, i, 40)))
    assert batched.engine.batcher.active == 0


def test_batched_chat_reuses_the_previous_turn_and_answers_the_same(embedded_model):
    """The batcher keeps each finished conversation's cache (prefix reuse) like the single path."""
    batched, alone = served(embedded_model), served(embedded_model, batching=False, prefix_tokens=0)
    messages = [{"role": "system", "content": "You are a helpful travel guide. " * 8},
                {"role": "user", "content": QUESTIONS[1]}]
    first = batched.generate(batched.job({"messages": messages, "temperature": 0, "max_new_tokens": 16})[0])
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And its museums?"}]
    params = {"messages": messages, "temperature": 0, "max_new_tokens": 16}
    second = batched.generate(batched.job(params)[0])
    assert second.reused_tokens > 50
    assert outcome(second) == outcome(alone.generate(alone.job(params)[0]))


def test_a_failing_step_fails_its_requests_and_the_next_request_is_served(embedded_model):
    sm = served(embedded_model, prefix_tokens=0)
    original = sm.model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    sm.model.forward = flaky
    with pytest.raises(RuntimeError, match="injected failure"):
        sm.generate(job_for(sm, 0, 8))
    assert sm.engine.batcher.active == 0
    assert sm.generate(job_for(sm, 0, 8)).completion_tokens > 0


def test_a_stream_whose_reader_fails_fails_alone_and_the_batch_goes_on(embedded_model):
    sm = served(embedded_model, prefix_tokens=0)
    jobs = [job_for(sm, i, 30) for i in range(2)]

    def broken_reader(text, n):
        raise RuntimeError("Event loop is closed")

    outcomes = [None, None]

    def first():
        try:
            sm.generate(jobs[0], broken_reader)
        except RuntimeError as exc:
            outcomes[0] = exc

    t = threading.Thread(target=first)
    t.start()
    outcomes[1] = sm.generate(jobs[1])
    t.join(timeout=300)
    assert isinstance(outcomes[0], RuntimeError) and "Event loop is closed" in str(outcomes[0])
    assert outcomes[1].finish_reason in ("stop", "length") and outcomes[1].completion_tokens > 0
    assert sm.engine.batcher.active == 0
    assert sm.generate(job_for(sm, 0, 4)).completion_tokens > 0


def test_a_batching_model_nobody_holds_is_freed_after_its_requests(tiny_llama):
    """The batch thread ends when the batch is empty: it does not keep a dropped model (and its memory) alive."""
    import weakref

    sm = served(tiny_llama, prefix_tokens=0)
    run_together(sm, [job_for(sm, i, 4) for i in range(2)])
    ref = weakref.ref(sm.model)
    del sm
    assert freed(ref), "something still holds the model after its batcher finished"
