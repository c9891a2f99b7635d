from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

# The suite is hermetic: an operator's own deployment settings in the shell (a worker secret, a host or profile to
# start, fault injection) would change what the tests start and talk to. Tests that need one set it themselves.
for _name in ("BUNDLE_WORKER_SECRET", "BUNDLE_HOST", "BUNDLE_PROFILE", "BUNDLE_ALLOW_FAULTS", "BUNDLE_MODELSCOPE_HOST"):
    os.environ.pop(_name, None)


@pytest.fixture(scope="session", autouse=True)
def fastchat_logs(tmp_path_factory) -> Path:
    """FastChat's server modules write a log file into $LOGDIR (default: the current directory) when imported: the
    tests that import them in this process write into the session's temporary folder."""
    os.environ["LOGDIR"] = str(tmp_path_factory.mktemp("fastchat-logs"))
    return Path(os.environ["LOGDIR"])


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The converted SmolLM2 folder (var/models, rebuilt only when the GGUF or converter changes)."""
    from workers.models.embedded import prepare

    return prepare()


@pytest.fixture(scope="session")
def int8_cache_root(tmp_path_factory) -> Path:
    """The session's INT8 cache. A test that runs pytest in a child process passes its own as
    BUNDLE_TEST_INT8_CACHE, so the child finds the entries already built instead of quantizing them again."""
    shared = os.environ.get("BUNDLE_TEST_INT8_CACHE")
    return Path(shared) if shared else tmp_path_factory.mktemp("int8-cache")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random-weight Llama (hidden 64) with the embedded model's tokenizer, fp32: quantizes in
    seconds, for the tests of the INT8 cache and quantizer that do not look at the answers."""
    from workers.tools import random_model

    return random_model.random_llama("tiny-llama", random_model.TINY, root=tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_bf16(tmp_path_factory) -> Path:
    """The same in bf16: the dtype of Qwen-7B-Chat's checkpoint."""
    from workers.tools import random_model

    return random_model.random_llama("tiny-llama-bf16", random_model.TINY, "bfloat16",
                                     root=tmp_path_factory.mktemp("tiny-llama-bf16"))


def build_int8_entry(embedded_model: Path, int8_cache_root: Path) -> Path:
    from workers.config.int8 import Int8Settings
    from workers.engine import int8_cache

    return int8_cache.ensure(embedded_model, Int8Settings(), int8_cache_root)


@pytest.fixture(scope="session")
def int8_entry(background, embedded_model, int8_cache_root) -> Path:
    """A freshly built INT8 cache entry of the embedded model (quantized once per test session, started with it:
    `background`), for the runtime the bundle gives it by default (neural-speed: a Llama-architecture model)."""
    return background.result("int8_entry", lambda: build_int8_entry(embedded_model, int8_cache_root))


def build_qbits_entry(embedded_model: Path, int8_cache_root: Path) -> Path:
    from workers.config.int8 import Int8Settings
    from workers.engine import int8_cache

    return int8_cache.ensure(embedded_model, Int8Settings(runtime="qbits"), int8_cache_root)


@pytest.fixture(scope="session")
def qbits_entry(background, embedded_model, int8_cache_root) -> Path:
    """The embedded model's INT8 entry for the qbits runtime (the default, auto, gives it neural-speed); about a
    minute of quantizing, started with the session (`background`)."""
    return background.result("qbits_entry", lambda: build_qbits_entry(embedded_model, int8_cache_root))


BACKGROUND = pytest.StashKey()


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    """Work the tests selected need, started beside others (tests/background.py): with the session, beside the unit
    lane, the default and the qbits INT8 entries of the embedded model and the neural-speed cases' own pytest process;
    when the integration lane begins, the model families' environments, folders, references and INT8 weights, and the
    fidelity cases' own pytest process."""
    from tests.background import Background
    from tests.neural_speed_run import CASES, run_cases

    work = Background()
    items = request.session.items
    for name, build in (("int8_entry", build_int8_entry), ("qbits_entry", build_qbits_entry)):
        if any(name in getattr(i, "fixturenames", ()) for i in items):
            model, root = request.getfixturevalue("embedded_model"), request.getfixturevalue("int8_cache_root")
            work.start(name, functools.partial(build, model, root))
    if any(i.path.name == "test_neural_speed.py" for i in items) and CASES.is_file():
        model, root = request.getfixturevalue("embedded_model"), request.getfixturevalue("int8_cache_root")
        work.start("neural_speed_cases", lambda: run_cases(tmp_path_factory, model, root))
    families = next((i for i in items if i.path.name == FAMILIES), None)
    if families is not None:
        work.defer("families", functools.partial(families.module.prepare, tmp_path_factory))
    fidelity = next((i for i in items if i.path.name == FIDELITY), None)
    if fidelity is not None:
        root = request.getfixturevalue("int8_cache_root")
        work.defer("fidelity_cases", functools.partial(fidelity.module.run_cases, tmp_path_factory, root))
    request.config.stash[BACKGROUND] = work
    yield work
    work.close()


FAMILIES, FIDELITY = "test_families.py", "test_fidelity.py"


def pytest_runtest_setup(item):
    """The integration lane begins: start the background work deferred until then. The families' bundles, which need
    most of the memory, start only once the fidelity cases' own process (and its bundles) has ended."""
    if item.path.is_relative_to(INTEGRATION) and BACKGROUND in item.config.stash:
        item.config.stash[BACKGROUND].start_deferred()
        if item.path.name == FAMILIES:
            item.config.stash[BACKGROUND].wait("fidelity_cases")


@pytest.fixture(scope="session")
def paragraph() -> str:
    return (Path(__file__).parent / "data" / "perplexity_paragraph.txt").read_text()


SERVED_INT8, SERVED_FP32 = "smol-int8", "smol-fp32"
API_KEYS = ("sk-test-alpha-7f3a9", "sk-test-beta-2c81e")


@pytest.fixture(scope="session")
def served_bundle(tmp_path_factory, embedded_model, int8_entry, int8_cache_root):
    """One bundle under supervisord for the API, browser and tool tests, with API keys required."""
    from tests.helpers import int8_and_fp32, running_bundle

    with running_bundle(tmp_path_factory.mktemp("served-bundle"), int8_and_fp32(SERVED_INT8, SERVED_FP32, limit_concurrency=4),
                        embedded_model.parent, int8_cache_root, {"BUNDLE_TEST_API_KEYS": ",".join(API_KEYS)},
                        api={"api_keys_env": "BUNDLE_TEST_API_KEYS"}, web={"title": "Test Bundle"}) as bundle:
        yield bundle


INTEGRATION = Path(__file__).parent / "integration"
QUANTIZING_FIXTURES = {"int8_entry", "qbits_entry", "served_bundle"}


def pytest_collection_modifyitems(config, items):
    """`slow` (pytest.ini) means what it says: every test that starts the bundle's programs (tests/integration) or
    quantizes a model (a quantizing fixture) carries it, and no other test needs to name it. A unit test that waits
    for the qbits entry the session builds in the background runs at the end of the unit lane, after the others."""
    for item in items:
        if item.path.is_relative_to(INTEGRATION) or QUANTIZING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    lane = next((k for k, i in enumerate(items) if i.path.is_relative_to(INTEGRATION)), len(items))  # unit first
    waiting = [i for i in items[:lane] if "qbits_entry" in getattr(i, "fixturenames", ())]
    items[:lane] = [i for i in items[:lane] if i not in waiting] + waiting
    # The fidelity cases run in their own process beside the integration lane, from its beginning. The families run
    # after the other modules (their bundles wait for that process to end), and the fidelity reports last.
    families = [i for i in items[lane:] if i.path.name == FAMILIES]
    reports = [i for i in items[lane:] if i.path.name == FIDELITY]
    items[lane:] = [i for i in items[lane:] if i not in families and i not in reports] + families + reports


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Before each integration module (the last module's fixtures torn down), give the memory of the models earlier
    tests loaded in-process back to the system: the bundles started next check that their workers fit in the
    memory available."""
    if nextitem is not None and nextitem.path != item.path and nextitem.path.is_relative_to(INTEGRATION):
        from workers.engine.loader import release_freed_memory

        release_freed_memory()
