"""int8.library: native end to end: the first load compiles llama.cpp for this CPU from the pinned version's source
(engine/runtimes/llama_cpp/native_build.py), the model runs on that library, it scores text as the prebuilt library
does, and its batched answers are its own answers alone. Opt-in: the compile takes about 5 minutes of 2 cores.

Not asserted: greedy answers equal to the prebuilt library's. The two builds' kernels round differently on short
batches (measured on SmolLM2: logits up to 1.4 apart, top-1 equal on 96-100 % of the answer's steps), so an answer can
take another word at a near tie and go on from there."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import outcome, run_together
from workers.config.int8 import Int8Settings
from workers.config.schema import ModelSpec
from workers.engine.loader import load_model
from workers.engine.runtimes.llama_cpp import native_build
from workers.engine.runtimes.llama_cpp.model import LlamaCppModel
from workers.engine.served_model import ServedModel

pytestmark = [
    pytest.mark.skipif(os.environ.get("BUNDLE_TEST_LLAMA_NATIVE") != "1",
                       reason="compiles llama.cpp (about 5 min on 2 cores); BUNDLE_TEST_LLAMA_NATIVE=1 runs it"),
    pytest.mark.timeout(1800),
]
QUESTIONS = ["What is the capital of France?", "Write one sentence about the sea.", "List three primary colors."]


def served(embedded_model, int8_cache_root, library: str) -> ServedModel:
    spec = ModelSpec(names=["m"], source={"path": str(embedded_model)}, port=1, limit_concurrency=4)
    model, tokenizer = load_model(embedded_model, "itrex-int8", int8=Int8Settings(runtime="llama-cpp", library=library),
                                  cache_root=int8_cache_root, concurrency=4)
    return ServedModel.build(spec, embedded_model, model, tokenizer)


@pytest.fixture(scope="module")
def native(embedded_model, int8_cache_root, tmp_path_factory) -> ServedModel:
    var = tmp_path_factory.mktemp("var")  # a host that has never built it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BUNDLE_VAR_DIR", str(var))
        sm = served(embedded_model, int8_cache_root, "native")
        built = native_build.library_file()
    assert built.parent.parent == var / "llama-cpp" and sm.model._lib._name == str(built)
    return sm


def bare(native: ServedModel, library) -> LlamaCppModel:
    """The same file on one slot, outside any batcher (whose slots a direct decode call would disturb)."""
    return LlamaCppModel(native.model.gguf, native.model.config, 2, 2048, 1, library)


def steps(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """The logits before each token of `answer`, given the tokens before it, one decode call per token."""
    model.empty_slots()
    rows = [model.evaluate_rows([prompt])[0]]
    rows += [model.evaluate_rows([[t]])[0] for t in answer[:-1]]
    return torch.cat(rows).float()


def test_it_scores_text_as_the_prebuilt_library(native, paragraph):
    prebuilt, built = bare(native, None), bare(native, Path(native.model._lib._name))
    ids = [native.tokenizer.bos_token_id] + native.tokenizer(paragraph).input_ids
    theirs, ours = prebuilt.all_logits(ids), built.all_logits(ids)
    nll = [float(torch.nn.functional.cross_entropy(x[:-1], torch.tensor(ids[1:]))) for x in (theirs, ours)]
    assert abs(nll[1] - nll[0]) <= 0.005 * nll[0], nll
    agree, total, answer_nll = 0, 0, []
    for question in QUESTIONS:  # the prebuilt library's greedy answer, one token a step, read by both
        messages = [{"role": "user", "content": question}]
        prompt = native.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prebuilt.empty_slots()
        answer, logits = [], prebuilt.evaluate_rows([prompt])[0]
        for _ in range(32):
            answer.append(int(logits.argmax()))
            logits = prebuilt.evaluate_rows([[answer[-1]]])[0]
        theirs, ours = steps(prebuilt, prompt, answer), steps(built, prompt, answer)
        agree, total = agree + int((theirs.argmax(-1) == ours.argmax(-1)).sum()), total + len(answer)
        answer_nll.append([float(torch.nn.functional.cross_entropy(x, torch.tensor(answer))) for x in (theirs, ours)])
    assert agree >= 0.9 * total, (agree, total)
    assert all(abs(o - t) <= 0.05 * t for t, o in answer_nll), answer_nll
    prebuilt.close()
    built.close()


def test_its_batched_answers_are_its_answers_alone(native):
    def job(i):
        return native.job({"messages": [{"role": "user", "content": QUESTIONS[i]}], "temperature": 0,
                           "max_new_tokens": 32})[0]

    alone = [outcome(native.generate(job(i))) for i in range(3)]
    assert [outcome(r) for r in run_together(native, [job(i) for i in range(3)])] == alone
    assert native.engine.runner.widest == 3
