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


SERVED_INT8, SERVED_FP32 = "smol-int8", "smol-fp32"
API_KEYS = ("sk-test-alpha-7f3a9", "sk-test-beta-2c81e")


@pytest.fixture(scope="session")
def served_bundle(tmp_path_factory, embedded_model, int8_entry, int8_cache_root):
    """One bundle under supervisord for the API and browser tests, with API keys required."""
    from tests.helpers import bundle_cli, bundle_env, bundle_processes, free_port, write_deployment

    var = tmp_path_factory.mktemp("served-bundle")
    source = {"embedded": "smollm2-135m-instruct"}
    conf, ports = write_deployment(var, [
        {"names": [SERVED_INT8], "source": source, "backend": "itrex-int8", "port": free_port(),
         "threads": 1, "cpu_cores": [0], "limit_concurrency": 4},
        {"names": [SERVED_FP32], "source": source, "backend": "fp32", "port": free_port(),
         "threads": 1, "cpu_cores": [1], "limit_concurrency": 4},
    ], api={"api_keys_env": "BUNDLE_TEST_API_KEYS"}, web={"title": "Test Bundle"})
    env = bundle_env(BUNDLE_VAR_DIR=str(var), BUNDLE_MODELS_DIR=str(embedded_model.parent),
                     BUNDLE_INT8_CACHE_DIR=str(int8_cache_root), BUNDLE_TEST_API_KEYS=",".join(API_KEYS))
    started = bundle_cli(env, "start", "--profile", conf, "--timeout", "600")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"env": env, "var": var, "ports": ports, "conf": conf,
               "api": f"http://127.0.0.1:{ports['api']}/v1", "web": f"http://127.0.0.1:{ports['web']}/",
               "controller": f"http://127.0.0.1:{ports['controller']}"}
    finally:
        bundle_cli(env, "stop")
        for p in bundle_processes(var):
            p.kill()
