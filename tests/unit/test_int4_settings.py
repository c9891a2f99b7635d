"""models[].int8.bits: 4 (INT4 weights): the schema, the group sizes ITREX's INT4 kernels refuse, the INT8 cache key
(a bits: 4 entry never reuses a bits: 8 folder), the quantizers' weight dtypes, and the start output."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from workers.config import deployment, rules
from workers.config.deployment import DeploymentError
from workers.config.int8 import AUTO_GROUP_SIZES, Int8Settings
from workers.config.schema import Deployment
from workers.engine import int8_cache
from workers.engine.runtimes import registry
from workers.engine.runtimes.neural_speed.quantize import WEIGHT_DTYPES as NS_WEIGHT_DTYPES
from workers.models.memory_budget import ModelShape, weight_bytes


def model(**int8):
    return {"names": ["m1"], "source": {"embedded": "smollm2-135m-instruct"}, "port": 22002, "threads": 1,
            "int8": int8}


def folder(tmp_path, widths):
    save_file({f"layer{i}.weight": torch.zeros(8, w) for i, w in enumerate(widths)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qbits-only-family"}))
    return tmp_path


def test_bits_is_8_by_default_and_4_on_request_anything_else_is_a_config_error(tmp_path):
    assert Int8Settings().bits == 8
    assert Deployment.model_validate({"models": [model(bits=4)]}).models[0].int8.bits == 4
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump({"models": [model(bits=5)]}))
    with pytest.raises(DeploymentError) as info:
        deployment.load(str(path), cpu_count=2)
    assert "models[0].int8.bits: Input should be 8 or 4" in str(info.value)


def test_rtn_settings_per_bits_int8_unchanged():
    assert Int8Settings(group_size=64).rtn_kwargs() == {"bits": 8, "weight_dtype": "int8", "compute_dtype": "fp32",
                                                         "group_size": 64, "scale_dtype": "fp32"}
    assert Int8Settings(bits=4, group_size=32).rtn_kwargs()["weight_dtype"] == "int4_clip"  # ITREX RtnConfig's name
    assert Int8Settings(bits=4, group_size=32).rtn_kwargs()["bits"] == 4
    assert NS_WEIGHT_DTYPES == {8: "int8", 4: "int4"}  # neural-speed's quant_model names them so


def test_a_group_size_the_int4_kernels_refuse_is_a_config_error_before_start():
    dep = Deployment.model_validate({"models": [model(bits=4, group_size=96)]})
    [problem] = rules.semantic_problems(dep, cpu_count=2, cpu_flags=frozenset({"avx2"}))
    assert problem.startswith("models[0].int8: group_size=96 with bits: 4: ITREX's INT4 kernels give wrong results")
    for fine in (32, 64, 128, -1, "auto"):
        dep = Deployment.model_validate({"models": [model(bits=4, group_size=fine)]})
        assert rules.semantic_problems(dep, cpu_count=2, cpu_flags=frozenset({"avx2"})) == []
    # INT8 keeps its own rule (any multiple of 32)
    dep = Deployment.model_validate({"models": [model(group_size=96)]})
    assert rules.semantic_problems(dep, cpu_count=2, cpu_flags=frozenset({"avx2"})) == []


def test_int4_group_auto_and_a_group_that_does_not_divide_every_row(tmp_path):
    (tmp_path / "even").mkdir(), (tmp_path / "odd").mkdir()
    even, odd = folder(tmp_path / "even", [576, 1536]), folder(tmp_path / "odd", [576, 1000])
    assert registry.resolve(Int8Settings(runtime="qbits", bits=4), even).group_size == AUTO_GROUP_SIZES[4]
    assert registry.resolve(Int8Settings(runtime="qbits", bits=4), odd).group_size == -1
    assert registry.resolve(Int8Settings(runtime="qbits"), even).group_size == AUTO_GROUP_SIZES[8] == 64
    with pytest.raises(registry.RuntimeUnavailable,
                       match="int8.group_size=128 does not divide the model's 576-wide weight rows"):
        registry.resolve(Int8Settings(runtime="qbits", bits=4, group_size=128), even)
    # INT8's kernels handle a last partial group: kept as before
    assert registry.resolve(Int8Settings(runtime="qbits", group_size=128), even).group_size == 128


@pytest.mark.parametrize("runtime", ["qbits", "neural-speed"])
def test_bits_are_part_of_the_int8_cache_key(embedded_model, tmp_path, runtime):
    eight = int8_cache.key_inputs(embedded_model, Int8Settings(runtime=runtime, group_size=32), tmp_path)
    four = int8_cache.key_inputs(embedded_model, Int8Settings(runtime=runtime, group_size=32, bits=4), tmp_path)
    assert (eight["settings"]["bits"], four["settings"]["bits"]) == (8, 4)
    assert int8_cache.entry_dir(embedded_model, eight, tmp_path) != int8_cache.entry_dir(embedded_model, four, tmp_path)
    # an INT8 entry is never accepted for INT4 settings, even if it sat in the INT4 folder
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "w.bin").write_bytes(b"x")
    (entry / int8_cache.MANIFEST).write_text(json.dumps({"inputs": eight, "files": {"w.bin": {"size": 1,
                                                                                                "sha256": "0"}}}))
    assert int8_cache.verify(entry, four) == "it was built from other inputs (source, settings or versions)"


def test_start_output_and_memory_budget_show_the_bits():
    assert Int8Settings(runtime="qbits", bits=4, group_size=32).describe() == "INT4 weights, qbits, groups of 32"
    assert Int8Settings(runtime="neural-speed", group_size=-1).describe() == "INT8 weights, neural-speed, per channel"
    shape = ModelShape(params=1_000_000, embedding=0, output=0, kv_bytes_per_token=0)
    assert weight_bytes(shape, "itrex-int8", 32, bits=4) == 1_000_000 * (0.5 + 4 / 32)
    assert weight_bytes(shape, "itrex-int8", "auto", bits=4) == weight_bytes(shape, "itrex-int8", 32, bits=4)
