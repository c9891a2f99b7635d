"""The grammar constraint (workers/engine/constraint.py) on a real vocabulary (the embedded SmolLM2's 49k tokens):
what json_object and json_schema allow, that the answer ends at a stop token once complete, and bad schemas."""
from __future__ import annotations

import json

import pytest
import torch

from workers.engine import constraint as c

VOCAB = 49152


@pytest.fixture(scope="module")
def grammars(embedded_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model)
    return tok, c.Grammars(tok, VOCAB)


def allowed(con) -> set[int]:
    logits = torch.zeros(1, VOCAB)
    con.mask(logits)
    return set((logits[0] == 0).nonzero().flatten().tolist())


def walk(tok, con, text: str) -> None:
    """Feed `text`'s tokens, each checked to be allowed first."""
    for t in tok.encode(text):
        assert t in allowed(con), (tok.decode([t]), text)
        con.accept(t)


def test_json_object_allows_an_object_then_only_the_stop_token(grammars):
    tok, g = grammars
    con = g.constraint(c.json_value(None), [tok.eos_token_id])
    first = allowed(con)
    assert first and all(tok.decode([t]).startswith("{") for t in first)   # no text, array or string first
    walk(tok, con, '{"a": [1, 2], "b": {"c": "x"}}')
    assert allowed(con) == {tok.eos_token_id} and not con.complete
    con.accept(tok.eos_token_id)
    assert con.complete


def test_json_schema_allows_only_its_values(grammars):
    tok, g = grammars
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "n": {"type": "integer"}},
              "required": ["color", "n"], "additionalProperties": False}
    con = g.constraint(c.json_value(schema), [tok.eos_token_id])
    walk(tok, con, '{"color": "')
    texts = {tok.decode([t]) for t in allowed(con)}
    assert texts and all("red".startswith(x) or "green".startswith(x) for x in texts), texts
    walk(tok, con, 'green", "n": 42}')
    assert allowed(con) == {tok.eos_token_id}


def test_the_mask_function_accepts_the_tokens_chosen_so_far(grammars):
    tok, g = grammars
    con = g.constraint(c.json_value({"type": "object", "properties": {"k": {"const": 1}}, "required": ["k"]}),
                       [tok.eos_token_id])
    prompt = tok.encode("Answer in JSON:")
    mask = con.as_mask(len(prompt))
    ids = list(prompt)
    for _ in range(50):
        scores = torch.randn(1, VOCAB) + mask(ids)
        token = int(scores.argmax())
        if token == tok.eos_token_id:
            break
        ids.append(token)
    assert json.loads(tok.decode(ids[len(prompt):])) == {"k": 1}


def test_a_schema_the_library_cannot_compile_is_a_grammar_error():
    with pytest.raises(c.GrammarError, match="JSON schema"):
        c.json_value({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})


def test_importing_the_constraint_module_builds_nothing_and_leaves_no_temporary_files(tmp_path):
    """xgrammar's tvm_ffi would JIT-compile a torch addon with the C++ compiler on every import (a worker start)
    and leave its build folder in the temporary directory; the module turns that off before importing it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TVM_FFI_DISABLE_TORCH_C_DLPACK"}
    env.update(TMPDIR=str(tmp_path), TVM_FFI_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", "import workers.engine.constraint"], env=env, check=True, timeout=300)
    assert list(tmp_path.iterdir()) == []
