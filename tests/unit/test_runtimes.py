"""The runtime seam (engine/runtimes): the registry chooses by data (its order of preference and each runtime's
match()), config's lists of names are the registry's, and the INT8 cache keys stay those entries were built with."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from workers.config import int8 as int8_config
from workers.config.int8 import Int8Settings
from workers.engine import int8_cache
from workers.engine.runtimes import registry
from workers.engine.runtimes.base import Runtime, RuntimeUnavailable, UnsupportedBackend
from workers.engine.runtimes.neural_speed.model import NeuralSpeedModel


class Stub(Runtime):
    """A runtime that serves `backends` and accepts a model when `why` is empty."""

    def __init__(self, name: str, backends: tuple[str, ...], why: str = ""):
        self.name, self.backends, self.why = name, backends, why

    def match(self, source, shared_threads, auto):
        return (not self.why), self.why

    def load(self, request, tokenizer):
        return None

    def owns(self, model):
        return False

    def serve(self, model, served, share=None, batching=True):
        return None


@pytest.fixture
def config_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tmp_path


def test_auto_takes_the_first_int8_runtime_that_matches_and_says_why_the_others_stepped_aside(
        monkeypatch, config_folder, caplog):
    stubs = (Stub("a", ("itrex-int8",), "no graph for it"), Stub("b", ("itrex-int8",)), Stub("c", ("itrex-int8",)),
             Stub("t", ("fp32", "bf16")))
    monkeypatch.setattr(registry, "RUNTIMES", stubs)
    with caplog.at_level(logging.INFO, "int8_runtime"):
        assert registry.resolve_runtime(Int8Settings(), config_folder).runtime == "b"
    assert f"INT8 runtime for {config_folder.name}: b (no graph for it)" in caplog.text
    assert registry.runtime_for("fp32", Int8Settings(), config_folder) is stubs[3]
    # named: that one, or why it cannot serve the model
    assert registry.runtime_for("itrex-int8", Int8Settings.model_construct(runtime="c"), config_folder) is stubs[2]
    with pytest.raises(RuntimeUnavailable, match="int8.runtime: a cannot serve .*: no graph for it"):
        registry.runtime_for("itrex-int8", Int8Settings.model_construct(runtime="a"), config_folder)
    with pytest.raises(UnsupportedBackend, match="backend 'int4' is not one of"):
        registry.runtime_for("int4", Int8Settings(), config_folder)


def test_a_second_runtime_for_a_backend_plugs_in_with_one_registry_line(monkeypatch, config_folder):
    newer = Stub("newer-transformers", ("fp32",), "its model_type is not one it runs")
    monkeypatch.setattr(registry, "RUNTIMES", (newer, *registry.RUNTIMES))
    assert registry.runtime_for("fp32", Int8Settings(), config_folder).name == "transformers"
    monkeypatch.setattr(newer, "why", "")
    assert registry.runtime_for("fp32", Int8Settings(), config_folder) is newer
    assert registry.runtime_for("bf16", Int8Settings(), config_folder).name == "transformers"


def test_config_names_the_registry_s_backends_and_int8_runtimes(monkeypatch):
    registry._check_config_names()
    monkeypatch.setattr(int8_config, "RUNTIMES", (*int8_config.RUNTIMES, "another"))
    with pytest.raises(AssertionError, match="int8.RUNTIMES"):
        registry._check_config_names()


def test_each_model_is_served_by_the_runtime_that_loaded_it():
    assert registry.runtime_of(object.__new__(NeuralSpeedModel)).name == "neural-speed"
    plain = torch.nn.Linear(2, 2)
    plain.config = type("Config", (), {})()
    assert registry.runtime_of(plain).name == "transformers"
    plain.config.quantization_config = {"bits": 8}
    assert registry.runtime_of(plain).name == "qbits"
    with pytest.raises(TypeError, match="no runtime serves"):
        registry.runtime_of(object())


def test_int8_cache_keys_are_those_of_the_entries_already_built(embedded_model, tmp_path):
    """qbits entries keep the key they had before runtimes existed; neural-speed's adds its name, version and layout."""
    base = {"format", "source", "settings", "versions"}
    versions = {"torch", "transformers", "intel-extension-for-transformers", "neural-compressor"}
    qbits = int8_cache.key_inputs(embedded_model, Int8Settings(runtime="qbits", group_size=64), tmp_path)
    assert set(qbits) == base and set(qbits["versions"]) == versions
    assert qbits["settings"] == {"bits": 8, "weight_dtype": "int8", "compute_dtype": "fp32", "group_size": 64,
                                 "scale_dtype": "fp32"}
    ns = int8_cache.key_inputs(embedded_model, Int8Settings(runtime="neural-speed", group_size=64), tmp_path)
    assert set(ns) == base | {"runtime", "ns_file_layout"} and ns["runtime"] == "neural-speed"
    assert set(ns["versions"]) == versions | {"neural-speed"} and ns["ns_file_layout"] == 2
    assert {k: v for k, v in ns.items() if k not in ("runtime", "ns_file_layout", "versions")} == \
        {k: v for k, v in qbits.items() if k != "versions"}
