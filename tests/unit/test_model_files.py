"""Today's models: the completeness check knows each family's files, and `bundle download` knows their
ModelScope ids (workers/models/families.py MODEL_FILES and KNOWN_MODELS, workers/models/check.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from workers.models import check, families
from workers.models.download import skip_patterns
from workers.ops.download import describe

TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"

# The files of the real repositories (their listing on ModelScope), tokenizer and weights.
REPOS = {
    "Qwen/Qwen3-8B": ("qwen3", 5, ["merges.txt", "vocab.json", "tokenizer.json"]),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", 4, ["merges.txt", "vocab.json", "tokenizer.json"]),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": ("qwen2", 2, ["tokenizer.json"]),
    "LLM-Research/Meta-Llama-3.1-8B-Instruct": ("llama", 4, ["tokenizer.json", "special_tokens_map.json"]),
    "LLM-Research/Phi-3.5-mini-instruct": ("phi3", 2, ["tokenizer.model", "tokenizer.json"]),
    "LLM-Research/phi-4": ("phi3", 6, ["merges.txt", "vocab.json", "tokenizer.json"]),
    "LLM-Research/gemma-2-9b-it": ("gemma2", 4, ["tokenizer.model", "tokenizer.json"]),
    "LLM-Research/gemma-3-1b-it": ("gemma3_text", 0, ["tokenizer.model", "tokenizer.json"]),
    "ZhipuAI/glm-4-9b-chat-hf": ("glm", 4, ["tokenizer.json"]),
    "ZhipuAI/GLM-4-9B-0414": ("glm4", 4, ["tokenizer.json"]),
    "HuggingFaceTB/SmolLM3-3B": ("smollm3", 2, ["tokenizer.json"]),
    "LLM-Research/Mistral-7B-Instruct-v0.3": ("mistral", 3, ["tokenizer.model", "tokenizer.json"]),
}


def write_repo(folder: Path, model_type: str, shards: int, tokenizer_files: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    for name in tokenizer_files:
        (folder / name).write_text("{}")
    if shards == 0:
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
        return folder
    names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    for i, name in enumerate(names):
        save_file({f"w{i}": torch.zeros(2)}, str(folder / name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {f"w{i}": n for i, n in enumerate(names)}}))
    return folder


@pytest.mark.parametrize("repo", REPOS)
def test_a_complete_download_of_each_family_passes(tmp_path, repo):
    model_type, shards, tokenizer = REPOS[repo]
    assert check.problems(write_repo(tmp_path / "m", model_type, shards, tokenizer), repo) == []


@pytest.mark.parametrize("repo", REPOS)
def test_a_missing_tokenizer_file_is_named(tmp_path, repo):
    model_type, shards, tokenizer = REPOS[repo]
    folder = write_repo(tmp_path / "m", model_type, shards, tokenizer)
    for name in ("tokenizer.json", "tokenizer.model"):
        (folder / name).unlink(missing_ok=True)
    [problem] = check.problems(folder)
    assert problem.startswith("tokenizer file tokenizer.json") and f"needed by {model_type} models" in problem
    (folder / "tokenizer_config.json").unlink()
    assert any("tokenizer file tokenizer_config.json is missing" in p for p in check.problems(folder))


def test_a_model_without_its_chat_template_is_incomplete(tmp_path):
    folder = write_repo(tmp_path / "m", "qwen3", 1, ["tokenizer.json"])
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 40960}))
    [problem] = check.problems(folder)
    assert problem.startswith("no chat template: tokenizer_config.json has no chat_template")
    (folder / "chat_template.jinja").write_text(TEMPLATE)  # where transformers >= 4.52 saves it
    assert check.problems(folder) == []


def test_shards_without_their_index_and_an_index_without_a_shard(tmp_path):
    folder = write_repo(tmp_path / "m", "qwen3", 5, ["tokenizer.json"])
    (folder / "model-00003-of-00005.safetensors").unlink()
    assert check.problems(folder) == ["weight shard model-00003-of-00005.safetensors is missing"]
    (folder / "model.safetensors.index.json").unlink()
    [problem] = check.problems(folder)
    assert problem.startswith("the weight index is missing: model-00001-of-00005.safetensors and 3 more shard(s)")


def test_a_folder_that_is_not_the_download_of_its_id(tmp_path):
    folder = write_repo(tmp_path / "m", "qwen2", 4, ["tokenizer.json"])
    [problem] = check.problems(folder, "Qwen/Qwen3-8B")
    assert "holds a 'qwen2' model, but Qwen/Qwen3-8B is a 'qwen3' model" in problem
    assert check.problems(folder, "some-org/unknown-model") == []  # ids the bundle does not know: not judged


def test_every_known_model_has_its_files_as_family_data():
    for model in families.KNOWN_MODELS:
        config = {"model_type": model.model_type}
        family = families.family_for_config(config)
        assert families.model_files(config) is not None or (family and family.tokenizer_files), model.modelscope
    assert families.known_model("qwen/qwen3-8b").modelscope == "Qwen/Qwen3-8B"  # ids are case-insensitive
    ids = [m.modelscope.lower() for m in families.KNOWN_MODELS]
    assert len(ids) == len(set(ids))


def test_download_names_known_models_and_likely_typos():
    assert describe("Qwen/Qwen3-8B") == "a qwen3 model; thinks: <think> ... </think>; enable_thinking switch"
    assert "did you mean LLM-Research/Meta-Llama-3.1-8B-Instruct" in describe("LLM-Research/Meta-Llama-3.1-8B-Instuct")
    assert describe("me/my-model") == "not one of the models the bundle knows"


def test_download_skips_the_weight_copies_the_bundle_does_not_load():
    llama = ["config.json", "model-00001-of-00004.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model"]
    assert skip_patterns(llama) == ["*.bin", "*.bin.index.json", "original/*"]
    mistral = ["config.json", "consolidated.safetensors", "model-00001-of-00003.safetensors",
               "model.safetensors.index.json", "params.json", "tokenizer.model.v3"]
    assert skip_patterns(mistral) == ["*.bin", "*.bin.index.json", "consolidated*"]
    assert skip_patterns(["config.json", "consolidated.safetensors", "params.json"]) == []  # the only copy: kept
