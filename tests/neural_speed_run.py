"""The neural-speed cases (tests/integration/neural_speed_cases.py) in a pytest process of their own
(tests/own_process.py; tests/integration/test_neural_speed.py says why they get one)."""
from __future__ import annotations

from pathlib import Path

from tests import own_process

CASES = own_process.ROOT / "tests" / "integration" / "neural_speed_cases.py"


def run_cases(tmp_path_factory, embedded_model: Path, int8_cache_root: Path) -> own_process.Run:
    """The embedded model's entry is built first, in the shared cache: the cases check that entry itself, and
    quantizing it again would only cost minutes."""
    from workers.config.int8 import Int8Settings
    from workers.engine import int8_cache

    int8_cache.ensure(embedded_model, Int8Settings(), int8_cache_root)
    return own_process.run(CASES, tmp_path_factory, int8_cache_root)
