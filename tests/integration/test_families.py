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
import os
from pathlib import Path

import pytest

from tests import tiny_families
from tests.helpers import ask_stream
from tests.tiny_families import CHAT_CASES, COMPLETION_PROMPT

# Two bundles, one after the other (14 and 12 workers: about 0.9-1.2 GiB each by the memory check, 16 GiB at most;
# a bundle's start and stop cost seconds of their own, so fewer and larger bundles make the module faster).
# INT8 (ITREX, the default runtime): qk-norm and MoE (qwen3, qwen3-moe), tied embeddings with llama3 rope
# (llama3.2), fused qkv with longrope (phi3.5), qkv bias with post norms (glm4-0414).
# INT8 on the llama-cpp runtime (GGUF Q8_0 from llama.cpp's converter): qwen2.5, qwen3, llama3.1 (llama3 rope),
# gemma3 (sliding window), glm4-0414 (the tiny phi and gemma2 folders hold no tokenizer.model, which llama.cpp's
# converter reads for those families).
GROUPS = {
    "qwen-llama": (("qwen2.5", "r1-distill-qwen", "qwen3", "qwen3-moe", "smollm3",
                    "llama3.1", "llama3.2", "llama3.3", "r1-distill-llama"), ("qwen3", "qwen3-moe", "llama3.2"),
                   ("qwen3", "llama3.1")),
    "phi-mistral-gemma-glm": (("phi3.5", "phi4", "mistral-nemo", "gemma2", "gemma3", "glm4-hf", "glm4-0414"),
                              ("phi3.5", "glm4-0414"), ("qwen2.5", "gemma3", "glm4-0414")),
}
FAMILIES = [f for fp32, _, _ in GROUPS.values() for f in fp32]
INT8 = [f for _, int8, _ in GROUPS.values() for f in int8]
MAX_TOKENS = 16
COMPLETION_TOKENS = 8


pytestmark = pytest.mark.timeout(1800)


def served_name(family: str, backend: str = "fp32") -> str:
    return f"tiny-{family}-{backend}"


def group_models(group: str, folders: dict[str, Path]) -> list[dict]:
    """The deployment's models of one group: every family in fp32, some in INT8 on ITREX and on llama-cpp."""
    from tests.helpers import free_port

    fp32, int8, llama_cpp = GROUPS[group]
    models = [{"names": [served_name(n)], "source": {"path": str(folders[n])}, "backend": "fp32",
               "port": free_port(), "threads": "shared"} for n in fp32]
    models += [{"names": [served_name(n, "int8")], "source": {"path": str(folders[n])}, "backend": "itrex-int8",
                "port": free_port(), "threads": "shared"} for n in int8]
    models += [{"names": [served_name(n, "llama-cpp")], "source": {"path": str(folders[n])}, "backend": "itrex-int8",
                "int8": {"runtime": "llama-cpp"}, "port": free_port(), "threads": "shared"} for n in llama_cpp]
    return models


def prepare(tmp_path_factory) -> dict:
    """What the bundles and the comparisons need: the families' environments, built as `bundle start` builds them
    (a no-op once built), their tiny folders, transformers' own answers in each family's environment, and each
    group's INT8 weights, built by `bundle prepare` into the cache its bundle then starts from. Started with the
    session beside the unit lane (tests/conftest.py, `background`); computed here when it was not."""
    from tests.helpers import bundle_cli, bundle_env, write_deployment
    from workers.ops import environments as ops_environments

    environments = {n: tiny_families.environment_of(n) for n in FAMILIES}
    problem = ops_environments.build_missing(list(environments.values()), print)
    assert problem is None, problem
    folders = tiny_families.built(FAMILIES)
    refs = tiny_families.references(folders, max_new_tokens=MAX_TOKENS, completion=COMPLETION_PROMPT,
                                    completion_tokens=COMPLETION_TOKENS)
    int8_roots, prepare_output = {}, {}
    for group in GROUPS:
        var, int8_roots[group] = (tmp_path_factory.mktemp(f"families-{kind}-{group}") for kind in ("prepare", "int8"))
        conf, _ = write_deployment(var, group_models(group, folders))
        done = bundle_cli(bundle_env(BUNDLE_VAR_DIR=str(var), BUNDLE_MODELS_DIR=str(tiny_families.CACHE),
                                     BUNDLE_INT8_CACHE_DIR=str(int8_roots[group])), "prepare", "--profile", conf)
        assert done.returncode == 0, done.stdout + done.stderr
        prepare_output[group] = done.stdout
    return {"environments": environments, "folders": folders, "refs": refs, "int8_roots": int8_roots,
            "prepare_output": prepare_output}


@pytest.fixture(scope="module")
def prepared(background, tmp_path_factory) -> dict:
    return background.result("families", lambda: prepare(tmp_path_factory))


@pytest.fixture(scope="module")
def environments(prepared) -> dict:
    return prepared["environments"]


@pytest.fixture(scope="module")
def folders(prepared) -> dict[str, Path]:
    return prepared["folders"]


@pytest.fixture(scope="module")
def refs(prepared) -> dict[str, dict]:
    return prepared["refs"]


@pytest.fixture(scope="module")
def bundle(request, prepared, tmp_path_factory):
    from openai import OpenAI

    from tests.helpers import running_bundle

    group = request.param
    with running_bundle(tmp_path_factory.mktemp(f"families-{group}"), group_models(group, prepared["folders"]),
                        tiny_families.CACHE, prepared["int8_roots"][group]) as b:
        yield {**b, "group": group, "client": OpenAI(base_url=b["api"], api_key="none", max_retries=0, timeout=120)}


def ask(client, model: str, messages: list[dict], max_tokens: int = MAX_TOKENS) -> dict:
    """A greedy answer; its text is what the model wrote: a reasoning model's reasoning_content, then its content
    (the steered tiny models write no think markers, so the two joined are generate()'s text)."""
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
    message = r.choices[0].message
    return {"text": (getattr(message, "reasoning_content", None) or "") + message.content,
            "finish_reason": r.choices[0].finish_reason,
            "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens}


def counted(answer: dict) -> dict:
    """What ask() returns, from a streamed answer (helpers.ask_stream)."""
    return {"text": answer["reasoning"] + answer["text"],
            **{k: answer[k] for k in ("finish_reason", "prompt_tokens", "completion_tokens")}}


def expected(ref: dict) -> dict:
    return {"text": ref["text"], "finish_reason": "length" if ref["stop_id"] is None else "stop",
            "prompt_tokens": len(ref["prompt_ids"]), "completion_tokens": len(ref["output_ids"])}


# Each test takes one group's bundle (only `bundle` is parametrised, so pytest runs a group's tests together)
# and checks every model of it, reporting every mismatch at once.
EACH_GROUP = pytest.mark.parametrize("bundle", GROUPS, indirect=True)


@EACH_GROUP
def test_each_family_runs_in_the_environment_its_config_needs(bundle, environments):
    """The supervisord program of each worker runs its environment's Python, chosen from config.json."""
    conf = (Path(bundle["var"]) / "run" / "supervisord.conf").read_text()
    for name in GROUPS[bundle["group"]][0]:
        line = next(l for l in conf.splitlines() if l.startswith("command =") and served_name(name) in l)
        venv = Path(line.split()[2]).parent.parent  # <venv>/bin/python (the interpreter itself is a link)
        assert venv.resolve() == environments[name].folder.resolve(), (name, line)
    assert {e.name for e in environments.values()} == {"pinned", "current"}
    assert sorted(FAMILIES) == sorted(tiny_families.FAMILIES)  # every tiny family is served


@EACH_GROUP
def test_chat_answers_equal_transformers_generate(bundle, refs):
    import openai

    wrong = {}
    for family in GROUPS[bundle["group"]][0]:
        for case, messages in CHAT_CASES.items():
            ref = refs[family][case]
            if "error" in ref:  # the family's own template refuses it (Gemma: no system role): a clear 400
                with pytest.raises(openai.BadRequestError, match="chat template"):
                    ask(bundle["client"], served_name(family), messages)
                continue
            assert ref["stop_id"] is not None, f"{family}: the steered answer should end at its turn-end token"
            got = ask(bundle["client"], served_name(family), messages)
            if got != expected(ref):
                wrong[(family, case)] = (got, expected(ref))
    assert not wrong, wrong


@EACH_GROUP
def test_stream_equals_non_stream(bundle, refs):
    wrong = {}
    for family in GROUPS[bundle["group"]][0]:
        messages = CHAT_CASES["multi"]
        once = ask(bundle["client"], served_name(family), messages)
        streamed = counted(ask_stream(bundle["client"], served_name(family), messages, MAX_TOKENS))
        if not streamed == once == expected(refs[family]["multi"]):
            wrong[family] = (streamed, once, expected(refs[family]["multi"]))
    assert not wrong, wrong


@EACH_GROUP
def test_completions_equal_transformers_generate(bundle, refs):
    wrong = {}
    for family in GROUPS[bundle["group"]][0]:
        ref = refs[family]["completion"]
        r = bundle["client"].completions.create(model=served_name(family), prompt=COMPLETION_PROMPT, temperature=0,
                                                max_tokens=COMPLETION_TOKENS)
        got = (r.choices[0].text, r.usage.prompt_tokens, r.usage.completion_tokens)
        if got != (ref["text"], len(ref["prompt_ids"]), len(ref["output_ids"])):
            wrong[family] = (got, ref)
    assert not wrong, wrong


@EACH_GROUP
def test_int8_answers_equal_fp32(bundle, refs):
    for family in GROUPS[bundle["group"]][1]:
        for case, messages in CHAT_CASES.items():
            if "error" in refs[family][case]:
                continue
            assert ask(bundle["client"], served_name(family, "int8"), messages) == expected(refs[family][case]), \
                (family, case)


@EACH_GROUP
def test_llama_cpp_answers_equal_fp32_streamed_or_not(bundle, refs):
    wrong = {}
    for family in GROUPS[bundle["group"]][2]:
        for case, messages in CHAT_CASES.items():
            if "error" in refs[family][case]:
                continue
            got = ask(bundle["client"], served_name(family, "llama-cpp"), messages)
            if got != expected(refs[family][case]):
                wrong[(family, case)] = (got, expected(refs[family][case]))
        streamed = counted(ask_stream(bundle["client"], served_name(family, "llama-cpp"), CHAT_CASES["multi"],
                                      MAX_TOKENS))
        if streamed != expected(refs[family]["multi"]):
            wrong[(family, "streamed")] = (streamed, expected(refs[family]["multi"]))
    assert not wrong, wrong


@EACH_GROUP
def test_bundle_prepare_quantizes_small_models_side_by_side_and_the_start_only_loads_them(bundle, prepared):
    """`bundle prepare` built the group's INT8 entries, several small models at once (engine/quantize_slots.py: a
    second build begins before the first is written); the start found every one of them in the cache."""
    lines = prepared["prepare_output"][bundle["group"]].splitlines()
    begun = [i for i, line in enumerate(lines) if "INT8 cache miss for" in line]
    written = [i for i, line in enumerate(lines) if "INT8 cache written to" in line]
    _, int8, llama_cpp = GROUPS[bundle["group"]]
    assert len(begun) == len(written) == len(int8) + len(llama_cpp), "\n".join(lines)
    if (os.cpu_count() or 1) >= 2:  # one core: one build at a time
        assert begun[1] < written[0], "\n".join(lines)
    start = bundle["start_output"]
    step = start[start.index("[2/4]"):start.index("[3/4]")]  # later lines quote the workers' logs while they load
    assert "INT8 cache miss" not in step and step.count("INT8 cache hit") == len(int8) + len(llama_cpp), start


@EACH_GROUP
def test_int8_of_a_current_family_was_quantized_by_its_own_environment(bundle, folders, environments):
    """The INT8 cache key records the versions of the environment that loads the entry (the model's own: 4.57.6 for
    the current families; qwen2.5 runs in the pinned one)."""
    _, int8, llama_cpp = GROUPS[bundle["group"]]
    recorded = {}
    for path in Path(bundle["env"]["BUNDLE_INT8_CACHE_DIR"]).glob("*/bundle_manifest.json"):
        family = next(f for f in {*int8, *llama_cpp} if path.parent.name.startswith(folders[f].name + "-"))
        recorded.setdefault(family, set()).add(json.loads(path.read_text())["inputs"]["versions"]["transformers"])
    assert recorded == {f: {environments[f].transformers} for f in {*int8, *llama_cpp}}
    assert "4.57.6" in set().union(*recorded.values())


def test_the_embedded_model_converted_from_the_current_environment_loads_in_the_pinned_one(environments, tmp_path,
                                                                                          embedded_model):
    """A tool run by .venv-current (memory_check, random models) may be the first to need the embedded model; the
    folder it leaves must load in the pinned environment, whose tokenizers reads no newer tokenizer.json."""
    import os
    import subprocess

    from transformers import AutoTokenizer

    from workers.config.environments import CURRENT, ROOT

    out = tmp_path / "embedded"
    code = f"from pathlib import Path; from workers.models.embedded import prepare; prepare(Path({str(out)!r}))"
    subprocess.run([CURRENT.python(), "-c", code], check=True, timeout=600,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    text = "Hello, world! 你好"
    assert AutoTokenizer.from_pretrained(out).encode(text) == AutoTokenizer.from_pretrained(embedded_model).encode(text)


def test_the_current_environment_is_a_layer_of_its_own_packages_over_the_pinned_one(environments):
    """.venv-current holds transformers 4.57.6 and what it needs beyond .venv; torch, ITREX and the rest are
    .venv's (a few hundred MB and seconds to build instead of a second 6.5 GB environment)."""
    import subprocess

    from workers.config.environments import CURRENT, PINNED

    code = "import json, torch, transformers; print(json.dumps([transformers.__version__, transformers.__file__, torch.__file__]))"
    out = subprocess.run([CURRENT.python(), "-c", code], capture_output=True, text=True, check=True, timeout=300).stdout
    version, transformers_file, torch_file = json.loads(out.strip().splitlines()[-1])
    assert version == CURRENT.transformers
    assert Path(transformers_file).resolve().is_relative_to(CURRENT.folder.resolve())
    assert Path(torch_file).resolve().is_relative_to(PINNED.folder.resolve())
