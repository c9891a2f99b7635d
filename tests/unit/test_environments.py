"""Which Python environment a model's worker runs in is decided from config.json (families.environment_for)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import tiny_families
from workers.config import environments
from workers.models.families import environment_for

ROOT = Path(__file__).resolve().parents[2]
MODEL_CODE = ROOT.parent / "shared" / "model-code"

# Where each tiny family runs: the pinned transformers (4.40.2) runs Qwen2 and Qwen2-based distills; the rest
# needs >= 4.41 (a model type it lacks, Llama 3.1's rope_type llama3, Mistral-Nemo's own head_dim).
EXPECTED = {"qwen2.5": "pinned", "r1-distill-qwen": "pinned", "qwen3": "current", "qwen3-moe": "current",
            "llama3.1": "current", "llama3.2": "current", "llama3.3": "current", "phi3.5": "current", "phi4": "current",
            "gemma2": "current", "gemma3": "current", "glm4-hf": "current", "glm4-0414": "current", "smollm3": "current",
            "mistral-nemo": "current", "r1-distill-llama": "current"}


@pytest.mark.parametrize("name", sorted(tiny_families.FAMILIES))
def test_each_family_gets_the_environment_its_config_needs(name):
    env, why = environment_for(tiny_families.FAMILIES[name].config)
    assert env.name == EXPECTED[name], why


def test_a_setting_not_the_model_type_moves_a_model():
    llama3 = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "rope_scaling": None}
    assert environment_for(llama3)[0] is environments.PINNED
    with_rope = {**llama3, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    env, why = environment_for(with_rope)
    assert env is environments.CURRENT and "rope_type llama3" in why and ">= 4.43" in why
    assert environment_for({**llama3, "head_dim": 128})[0] is environments.PINNED          # 4096 / 32
    assert environment_for({**llama3, "head_dim": 64})[0] is environments.CURRENT


def test_a_model_type_the_pinned_transformers_lacks_goes_to_the_newest():
    env, why = environment_for({"model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"]})
    assert env is environments.ENVIRONMENTS[-1]
    assert "unknown to transformers 4.40.2" in why


@pytest.mark.skipif(not (MODEL_CODE / "chatglm3" / "config.tiny.json").is_file(), reason="../shared/model-code missing")
@pytest.mark.parametrize("family", ["chatglm3", "qwen"])
def test_seed_models_remote_code_stays_pinned(family):
    config = json.loads((MODEL_CODE / family / "config.tiny.json").read_text())
    assert environment_for(config)[0] is environments.PINNED


def test_a_layer_reports_its_own_packages_first_then_its_bases(tmp_path):
    """The INT8 cache key records the versions a layer environment really imports: its own (transformers) where it
    has them, its base's (torch) otherwise."""
    def install(venv: Path, name: str, version: str) -> None:
        info = venv / "lib" / "python3.11" / "site-packages" / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")

    install(tmp_path / "base", "transformers", "4.40.2")
    install(tmp_path / "base", "torch", "2.3.0")
    install(tmp_path / "layer", "transformers", "4.57.6")
    base = environments.Environment("b", str(tmp_path / "base"), "4.40.2")
    layer = environments.Environment("l", str(tmp_path / "layer"), "4.57.6", base=base)
    assert environments.versions(layer, ("transformers", "torch")) == {"transformers": "4.57.6", "torch": "2.3.0"}
    assert environments.versions(base, ("transformers",)) == {"transformers": "4.40.2"}
    with pytest.raises(Exception, match="accelerate is not installed"):
        environments.versions(layer, ("accelerate",))
