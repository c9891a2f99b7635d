"""(Run by test_neural_speed.py in a process of its own.) The neural-speed INT8 runtime (int8.runtime: auto on
a Llama), on the embedded model: the graph
file computes what the model computes (identity layers pad 30 layers to the graph's 32), INT8
quality against fp32, answers token for token what neural-speed's own generate() gives, reuse of
the conversation cache, cancellation, and which runtime each model gets."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from workers.config.int8 import Int8Settings
from workers.config.schema import ModelSpec
from workers.engine import int8_runtime, ns_quantize
from workers.engine.loader import UnsupportedBackend, load_model
from workers.engine.ns_model import NeuralSpeedModel, scratch_ratio
from workers.engine.served_model import ServedModel

QUESTIONS = ["What is the capital of France?", "Write one sentence about the sea.", "List three primary colors."]


@pytest.fixture(scope="module")
def fp32(embedded_model):
    return load_model(embedded_model, "fp32")


@pytest.fixture(scope="module")
def ns(embedded_model, int8_entry, int8_cache_root) -> ServedModel:
    spec = ModelSpec(names=["m"], source={"path": str(embedded_model)}, port=1)
    model, tokenizer = load_model(embedded_model, "itrex-int8", cache_root=int8_cache_root)
    assert isinstance(model, NeuralSpeedModel) and model.entry == int8_entry
    return ServedModel.build(spec, embedded_model, model, tokenizer)


def fp32_logits(fp32, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return fp32[0](torch.tensor([ids])).logits[0].float()


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    return float(torch.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))))


# --- which runtime ----------------------------------------------------------------------------

def folder_with(tmp_path: Path, name: str, config: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_auto_gives_a_llama_neural_speed_and_everything_else_qbits(embedded_model, tmp_path):
    auto = Int8Settings()
    assert int8_runtime.resolve(auto, embedded_model).runtime == "neural-speed"
    llama = json.loads((embedded_model / "config.json").read_text())
    others = {
        "chatglm": {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "num_layers": 28},
        "qwen": {"model_type": "qwen", "architectures": ["QWenLMHeadModel"]},
        "scaled-rope": {**llama, "rope_scaling": {"type": "linear", "factor": 2.0}},
        "too-deep": {**llama, "num_hidden_layers": 81},
        # 22 layers would run as 32 (measured: qbits, which batches, serves it better)
        "tinyllama-shaped": {**llama, "num_hidden_layers": 22},
    }
    for name, config in others.items():
        assert int8_runtime.resolve(auto, folder_with(tmp_path, name, config)).runtime == "qbits", name
    assert int8_runtime.resolve(auto, folder_with(tmp_path, "llama-2-7b-shaped", {**llama, "num_hidden_layers": 32})) \
        .runtime == "neural-speed"
    # asked for explicitly, a model that needs many identity layers still gets it
    assert int8_runtime.resolve(Int8Settings(runtime="neural-speed"), tmp_path / "tinyllama-shaped").runtime \
        == "neural-speed"
    # neural-speed takes its thread count at load: cores shared by demand need qbits
    assert int8_runtime.resolve(auto, embedded_model, shared_threads=True).runtime == "qbits"
    with pytest.raises(int8_runtime.RuntimeUnavailable, match="no graph the bundle uses for model_type 'chatglm'"):
        int8_runtime.resolve(Int8Settings(runtime="neural-speed"), tmp_path / "chatglm")
    with pytest.raises(UnsupportedBackend, match="threads: shared"):
        load_model(embedded_model, "itrex-int8", int8=Int8Settings(runtime="neural-speed"), shared_threads=True)


def test_layer_padding_goes_to_the_next_count_the_graph_knows():
    counts = (32, 40, 60, 80)
    assert [ns_quantize.padded_layers(n, counts) for n in (22, 30, 32, 33, 80)] == [32, 32, 32, 40, 80]
    with pytest.raises(ValueError, match="at most 80"):
        ns_quantize.padded_layers(81, counts)


# --- the graph is the model -------------------------------------------------------------------

def test_padded_fp32_graph_file_computes_the_models_own_logits(embedded_model, fp32, paragraph, tmp_path):
    """30 layers + 2 identity layers in neural-speed's llama graph, unquantized: HF's logits."""
    from neural_speed import Model

    f32 = tmp_path / "f32.bin"
    info = ns_quantize.convert_f32(embedded_model, f32, (32, 40, 60, 80), trust_remote_code=False)
    assert info == {"layers": 30, "graph_layers": 32}
    ids = [fp32[1].bos_token_id] + fp32[1](paragraph).input_ids[:200]  # the graph takes BOS-first sequences
    graph = Model()
    # an fp32 KV cache: this checks the converted graph. (The default, the library's own KV layout, is
    # bf16-like on AVX512/AMX CPUs: logits within 0.2 there, measured; the INT8 perplexity test covers it.)
    graph.init_from_bin("llama", str(f32), threads=1, ctx_size=512, memory_dtype="f32")
    ours = torch.from_numpy(graph.model.evaluate([ids], True)[0].copy())
    theirs = fp32_logits(fp32, ids)
    assert ours.shape == theirs.shape
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.99
    assert torch.allclose(ours, theirs, atol=0.02, rtol=0), float((ours - theirs).abs().max())


def test_int8_perplexity_within_half_a_percent_of_fp32(ns, fp32, paragraph):
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    before = ns.generate(job(ns, messages)).text
    ids = [fp32[1].bos_token_id] + fp32[1](paragraph).input_ids
    ppl32 = perplexity(fp32_logits(fp32, ids), ids)
    ppl8 = perplexity(ns.model.all_logits(ids), ids)
    assert ppl8 <= ppl32 * 1.005, (ppl32, ppl8)
    # and generation afterwards is what it was before (the library needs a reload after all-logits)
    assert ns.generate(job(ns, messages)).text == before


# --- generation ------------------------------------------------------------------------------

def job(sm: ServedModel, messages, max_tokens=40, **extra):
    return sm.job({"messages": messages, "temperature": 0, "max_new_tokens": max_tokens, **extra})[0]


def test_answers_are_neural_speeds_own_greedy_generate(ns):
    """Our decode loop over evaluate() == the library's generate() on the same file (greedy)."""
    from neural_speed import Model

    own = Model()  # its generate() settings are taken here, at init (its default repetition penalty is not 1)
    # the same context and scratch size as the served model (they change the float rounding a little)
    own.init_from_bin("llama", str(ns.model.entry / ns_quantize.WEIGHTS), threads=1, ctx_size=ns.model.context,
                      scratch_size_ratio=scratch_ratio(ns.model.context), do_sample=False, repetition_penalty=1.0)
    for question in QUESTIONS:
        j = job(ns, [{"role": "user", "content": question}])
        ours = ns.generate(j)
        out = own.generate(torch.tensor([j.prompt_ids]), max_new_tokens=j.max_new_tokens, do_sample=False,
                           repetition_penalty=1.0, ignore_prompt=True)[0]
        stop = next((i for i, t in enumerate(out) if t in j.stop_token_ids), None)
        theirs = out if stop is None else out[:stop]
        assert ours.text == ns.chat.postprocess(ns.decode(theirs)), question
        assert ours.finish_reason == ("length" if stop is None else "stop")
    assert "Paris" in ns.generate(job(ns, [{"role": "user", "content": QUESTIONS[0]}])).text


def test_next_turn_reuses_the_conversation_cache_and_answers_as_from_scratch(ns):
    turn = [{"role": "user", "content": "Name a large river."}]
    first = ns.generate(job(ns, turn, 24))
    turn += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Where does it flow?"}]
    second = job(ns, turn, 24)
    reused = ns.generate(second)
    assert reused.reused_tokens > len(second.prompt_ids) // 2
    ns.model.state = ["forgotten"]  # nothing matches: a fresh cache
    fresh = ns.generate(job(ns, turn, 24))
    assert fresh.reused_tokens == 0
    assert (fresh.text, fresh.finish_reason) == (reused.text, reused.finish_reason)


def test_a_prompt_the_graph_cannot_take_is_refused_with_what_to_do(ns):
    from workers.engine.served_model import BadRequest

    with pytest.raises(BadRequest, match=r"start with the BOS token \(id 1\).*runtime: qbits"):
        ns.job({"prompt": "Once upon a time", "max_new_tokens": 4})
    long_chat = [{"role": "user", "content": "Summarise: " + "the river runs to the sea. " * 250}]
    long = job(ns, long_chat, 8)
    assert len(long.prompt_ids) > 1500  # more than one of neural-speed's prompt batches
    assert ns.generate(long).completion_tokens >= 1


def test_stop_strings_penalties_and_sampling_apply(ns):
    messages = [{"role": "user", "content": "Count from one to twenty in words, separated by commas."}]
    plain = ns.generate(job(ns, messages, 30))
    word = plain.text.split()[3]
    cut = ns.generate(job(ns, messages, 30, stop=[word]))
    assert cut.finish_reason == "stop" and word not in cut.text and plain.text.startswith(cut.text), (plain.text, word)
    penalised = ns.generate(job(ns, messages, 30, frequency_penalty=2.0))
    assert penalised.text != plain.text
    sampled = {ns.generate(job(ns, messages, 12, temperature=1.5, top_p=1.0)).text for _ in range(3)}
    assert len(sampled) > 1


def test_cancel_stops_a_running_generation_and_a_queued_one_leaves_at_once(ns):
    running = job(ns, [{"role": "user", "content": "Tell me a long story about a dragon."}], 400)
    queued = job(ns, [{"role": "user", "content": "Hi!"}], 10)
    results = {}
    tokens = []

    def on_text(text, n):
        tokens.append(n)
        if n >= 5:
            running.cancel.set()
            time.sleep(0.3)  # the queued request is waiting for the model meanwhile

    first = threading.Thread(target=lambda: results.setdefault("running", ns.generate(running, on_text)))
    first.start()
    while not tokens:
        time.sleep(0.01)
    second = threading.Thread(target=lambda: results.setdefault("queued", ns.generate(queued)))
    second.start()
    queued.cancel.set()
    second.join(timeout=30)
    first.join(timeout=30)
    assert results["running"].finish_reason == "cancelled" and results["running"].completion_tokens <= 7
    assert results["queued"].finish_reason == "cancelled" and results["queued"].completion_tokens == 0
    assert ns.generate(job(ns, [{"role": "user", "content": QUESTIONS[0]}])).finish_reason == "stop"
