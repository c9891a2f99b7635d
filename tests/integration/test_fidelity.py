"""Every model speaks as itself, through the real bundle: the cases of fidelity_cases.py (its docstring says what they
prove), run by pytest in a process of their own and reported here one by one (tests/own_process.py).

Their bundles are workers of one pinned thread each, asked one question at a time: about one core of the two. In a
process of their own they run beside the rest of the integration lane, which mostly keeps about one core busy too.
The process starts with the integration lane (tests/conftest.py); test_families.py, whose bundles need most of the
memory, runs after the other modules and waits for it to end; these reports run last.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests import own_process

CASES = Path(__file__).with_name("fidelity_cases.py")

pytestmark = pytest.mark.timeout(own_process.RUN_TIMEOUT_S + 60)  # the first case's time includes the run of them all


def run_cases(tmp_path_factory, int8_cache_root: Path) -> own_process.Run:
    return own_process.run(CASES, tmp_path_factory, int8_cache_root)


@pytest.fixture(scope="module")
def cases_run(background, tmp_path_factory, int8_cache_root) -> own_process.Run:
    """All cases in one child pytest, started by the session where it runs this file (tests/conftest.py)."""
    return background.result("fidelity_cases", lambda: run_cases(tmp_path_factory, int8_cache_root))


@pytest.mark.parametrize("case", own_process.case_names(CASES))
def test_fidelity_case(cases_run, case):
    kind, text = own_process.report(cases_run, case)
    if kind == "skipped":
        pytest.skip(text.strip())
