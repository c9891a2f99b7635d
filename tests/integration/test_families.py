"""Today's model families load and answer as themselves, each in the environment its family needs.

One supervised bundle serves a tiny random-weight model of every family in tests/tiny_families.py
(real tokenizers, chat templates, generation_config eos ids and the distinctive config settings), in
fp32, and several of them in ITREX INT8 as well. Each worker runs in the Python environment the bundle
picks from config.json (workers/models/families.py: transformers 4.40.2 for what it runs, 4.57.6 for
Qwen3, Gemma 2/3, Phi-3/4, GLM-4, SmolLM3, Llama 3.1+ rope scaling, Mistral-Nemo's head_dim).

Through the official openai client: a greedy chat answer equals transformers' own generate() on
apply_chat_template in that same environment (text, finish reason, exact token counts), stopping on
the family's generation_config eos ids; streamed equals non-streamed; plain-text completions equal
generate() on the tokenizer's encoding; a template that refuses a conversation (Gemma: no system role)
is a 400; INT8 answers equal the fp32 ones (the steered answers have margins of many logits).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import tiny_families
from tests.tiny_families import CHAT_CASES, COMPLETION_PROMPT

FAMILIES = list(tiny_families.FAMILIES)
INT8 = ("qwen3", "llama3.2", "phi3.5", "glm4-0414")  # tied + qk-norm, tied + llama3 rope, fused qkv, qkv bias
MAX_TOKENS = 16
COMPLETION_TOKENS = 8

pytestmark = pytest.mark.timeout(1800)


def served_name(family: str, backend: str = "fp32") -> str:
    return f"tiny-{family}-{backend}"


@pytest.fixture(scope="module")
def environments():
    """The environments the families need, built as `bundle start` builds them (a no-op once built)."""
    from workers.config.environments import ROOT
    from workers.ops import environments as ops_environments

    needed = [tiny_families.environment_of(n) for n in FAMILIES]
    problem = ops_environments.build_missing(needed, print)
    assert problem is None, problem
    return {n: tiny_families.environment_of(n) for n in FAMILIES}


@pytest.fixture(scope="module")
def folders(environments) -> dict[str, Path]:
    return tiny_families.built(FAMILIES)


@pytest.fixture(scope="module")
def refs(folders) -> dict[str, dict]:
    return tiny_families.references(folders, max_new_tokens=MAX_TOKENS, completion=COMPLETION_PROMPT,
                                    completion_tokens=COMPLETION_TOKENS)


@pytest.fixture(scope="module")
def bundle(folders, tmp_path_factory):
    from openai import OpenAI

    from tests.helpers import free_port, running_bundle

    models = [{"names": [served_name(n)], "source": {"path": str(folders[n])}, "backend": "fp32",
               "port": free_port(), "threads": "shared"} for n in FAMILIES]
    models += [{"names": [served_name(n, "int8")], "source": {"path": str(folders[n])}, "backend": "itrex-int8",
                "port": free_port(), "threads": "shared"} for n in INT8]
    with running_bundle(tmp_path_factory.mktemp("families"), models, tiny_families.CACHE,
                        tmp_path_factory.mktemp("families-int8")) as b:
        yield {**b, "client": OpenAI(base_url=b["api"], api_key="none", max_retries=0, timeout=120)}


def ask(client, model: str, messages: list[dict], max_tokens: int = MAX_TOKENS) -> dict:
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
    return {"text": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason,
            "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens}


def ask_stream(client, model: str, messages: list[dict], max_tokens: int = MAX_TOKENS) -> dict:
    stream = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    return {"text": "".join(pieces), "finish_reason": finish, "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens}


def expected(ref: dict) -> dict:
    return {"text": ref["text"], "finish_reason": "length" if ref["stop_id"] is None else "stop",
            "prompt_tokens": len(ref["prompt_ids"]), "completion_tokens": len(ref["output_ids"])}


def test_each_family_runs_in_the_environment_its_config_needs(bundle, folders, environments):
    """The supervisord program of each worker runs its environment's Python, chosen from config.json."""
    conf = (Path(bundle["var"]) / "run" / "supervisord.conf").read_text()
    for name in FAMILIES:
        line = next(l for l in conf.splitlines() if l.startswith("command =") and served_name(name) in l)
        venv = Path(line.split()[2]).parent.parent  # <venv>/bin/python (the interpreter itself is a link)
        assert venv.resolve() == environments[name].folder.resolve(), (name, line)
    assert {e.name for e in environments.values()} == {"pinned", "current"}


@pytest.mark.parametrize("case", CHAT_CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_chat_answer_equals_transformers_generate(bundle, refs, family, case):
    import openai

    ref = refs[family][case]
    if "error" in ref:  # the family's own template refuses it (Gemma: no system role): a clear 400
        with pytest.raises(openai.BadRequestError, match="chat template"):
            ask(bundle["client"], served_name(family), CHAT_CASES[case])
        return
    assert ref["stop_id"] is not None, "the tiny model's steered answer should end at its turn-end token"
    assert ask(bundle["client"], served_name(family), CHAT_CASES[case]) == expected(ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_equals_non_stream(bundle, refs, family):
    case = "multi"
    once = ask(bundle["client"], served_name(family), CHAT_CASES[case])
    assert ask_stream(bundle["client"], served_name(family), CHAT_CASES[case]) == once == expected(refs[family][case])


@pytest.mark.parametrize("family", FAMILIES)
def test_completion_equals_transformers_generate(bundle, refs, family):
    ref = refs[family]["completion"]
    r = bundle["client"].completions.create(model=served_name(family), prompt=COMPLETION_PROMPT, temperature=0,
                                            max_tokens=COMPLETION_TOKENS)
    assert (r.choices[0].text, r.usage.prompt_tokens, r.usage.completion_tokens) == (
        ref["text"], len(ref["prompt_ids"]), len(ref["output_ids"]))


@pytest.mark.parametrize("family", INT8)
def test_int8_answers_equal_fp32(bundle, refs, family):
    for case, messages in CHAT_CASES.items():
        if "error" in refs[family][case]:
            continue
        assert ask(bundle["client"], served_name(family, "int8"), messages) == expected(refs[family][case]), case


def test_int8_of_a_current_family_was_quantized_by_its_own_environment(bundle, folders):
    """The INT8 cache key records the versions of the environment that quantized and loads the entry."""
    entries = [json.loads(p.read_text()) for p in Path(bundle["env"]["BUNDLE_INT8_CACHE_DIR"]).glob("*/bundle_manifest.json")]
    transformers = {e["inputs"]["versions"]["transformers"] for e in entries}
    assert transformers == {"4.57.6"}, transformers
