from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The converted SmolLM2 folder (var/models, rebuilt only when the GGUF or converter changes)."""
    from workers.embedded_model import prepare

    return prepare()


@pytest.fixture(scope="session")
def int8_cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("int8-cache")


@pytest.fixture(scope="session")
def int8_entry(embedded_model, int8_cache_root) -> Path:
    """A freshly built INT8 cache entry of the embedded model (quantized once per test session)."""
    from workers import int8_cache
    from workers.int8_settings import Int8Settings

    return int8_cache.ensure(embedded_model, Int8Settings(), int8_cache_root)


@pytest.fixture(scope="session")
def paragraph() -> str:
    return (Path(__file__).parent / "data" / "perplexity_paragraph.txt").read_text()
