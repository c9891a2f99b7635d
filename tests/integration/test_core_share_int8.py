"""INT8 answers stay exact while the thread count changes between decode steps (cores shared by
demand): qbits' thread count and the OpenMP team move together, under the worker's step lock."""
from __future__ import annotations


import torch

from workers.config.int8 import Int8Settings
from workers.config.schema import ModelSpec
from workers.engine import threads
from workers.engine.core_share import CoreShare
from workers.engine.loader import load_model
from workers.engine.served_model import ServedModel
from tests.helpers import another_worker_flipping

QUESTION = [{"role": "user", "content": "Name three rivers of Europe and say one thing about each."}]


def answer(served: ServedModel):
    job, _ = served.job({"messages": QUESTION, "temperature": 0, "max_new_tokens": 40})
    return served.generate(job)


def test_int8_greedy_answer_is_unchanged_while_the_share_flips(embedded_model, qbits_entry, int8_cache_root,
                                                              tmp_path, monkeypatch):
    monkeypatch.setenv("BUNDLE_INT8_CACHE_DIR", str(int8_cache_root))
    spec = ModelSpec(names=["m"], source={"path": str(embedded_model)}, port=1, prefix_cache_tokens=0)
    # Shared cores run INT8 on qbits (neural-speed fixes its thread count at load: engine/runtimes/neural_speed).
    model, tokenizer = load_model(embedded_model, "itrex-int8", int8=Int8Settings(runtime="qbits"),
                                  cache_root=int8_cache_root, shared_threads=True)
    before = torch.get_num_threads()
    try:
        check_answers_while_the_share_flips(spec, embedded_model, model, tokenizer, tmp_path)
    finally:  # qbits' thread count is process-wide: later tests in this process run with the default again
        threads.apply_to_torch(before)


def check_answers_while_the_share_flips(spec, embedded_model, model, tokenizer, tmp_path):
    threads.apply_to_torch(1)
    fixed = answer(ServedModel.build(spec, embedded_model, model, tokenizer))

    share = CoreShare(tmp_path, "m", cores=2)
    other = CoreShare(tmp_path, "other-worker", cores=2)
    seen = set()
    original_apply = share.apply
    share.apply = lambda: seen.add(original_apply()) or max(seen)
    served = ServedModel.build(spec, embedded_model, model, tokenizer, share)
    with another_worker_flipping(other):
        shared = answer(served)
    assert seen == {1, 2}, "the share should have changed during the answer"
    assert (shared.text, shared.completion_tokens) == (fixed.text, fixed.completion_tokens)
