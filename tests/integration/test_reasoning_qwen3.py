"""Qwen3's thinking switch through the supervised bundle, with the official openai client: its worker runs in
the environment Qwen3 needs (.venv-current, transformers 4.57), `chat_template_kwargs: {enable_thinking}` reaches
its real chat template there, and its answers carry reasoning_content (a reasoning model's field: null when it did
not think). The model is tests/tiny_families.py's Qwen3, steered to answer "Hello from a" and <|im_end|> after its
generation prompt; the split itself is proven on the R1 distill (tests/integration/test_reasoning_api.py)."""
from __future__ import annotations

import pytest
from openai import OpenAI

from tests import tiny_families
from tests.helpers import free_port, running_bundle

MODEL = "qwen3-tiny"
HELLO = [{"role": "user", "content": "Hello"}]
OFF = {"chat_template_kwargs": {"enable_thinking": False}}

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def folder():
    from workers.ops import environments as ops_environments

    problem = ops_environments.build_missing([tiny_families.environment_of("qwen3")], print)
    assert problem is None, problem
    return tiny_families.built(["qwen3"])["qwen3"]


@pytest.fixture(scope="module")
def client(folder, tmp_path_factory):
    models = [{"names": [MODEL], "source": {"path": str(folder)}, "backend": "fp32", "port": free_port(),
               "threads": 1, "prefix_cache_tokens": 0}]
    with running_bundle(tmp_path_factory.mktemp("qwen3"), models, tiny_families.CACHE,
                        tmp_path_factory.mktemp("qwen3-int8")) as b:
        yield OpenAI(base_url=b["api"], api_key="none", max_retries=0, timeout=180)


def test_qwen3_answers_with_the_reasoning_field_and_its_own_reference(client, folder):
    ref = tiny_families.references({"qwen3": folder}, max_new_tokens=16, cases={"single": HELLO},
                                   completion=None)["qwen3"]["single"]
    r = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=16)
    message = r.choices[0].message
    assert message.content == ref["text"] and r.usage.prompt_tokens == len(ref["prompt_ids"])
    assert "reasoning_content" in message.model_extra and message.reasoning_content is None  # it did not think


def test_enable_thinking_false_closes_an_empty_thinking_block_in_the_prompt(client):
    on = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=4)
    off = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=4, extra_body=OFF)
    # "<think>", "\n\n", "</think>", "\n\n" (tests/unit/test_reasoning_families.py decodes them)
    assert off.usage.prompt_tokens == on.usage.prompt_tokens + 4
    assert off.choices[0].message.reasoning_content is None
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=4, stream=True,
                                            extra_body=OFF)
    assert not any(getattr(c.choices[0].delta, "reasoning_content", None) for c in stream if c.choices)
