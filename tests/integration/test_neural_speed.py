"""The neural-speed runtime's tests (neural_speed_cases.py), run by pytest in a process of their own and
reported here one by one (tests/own_process.py).

neural-speed and ITREX's qbits both embed the bestla kernels under the same symbols; in a process
that had loaded qbits models (earlier tests of this suite), neural-speed segfaulted. A serving worker
runs one INT8 runtime (threads.apply_to_torch never loads qbits next to neural-speed), so the tests
of neural-speed get a process of their own too: it runs them all once (its outcomes read from its JUnit
XML report), and each case is a test of this file that passes, fails or skips as it did there.
"""
from __future__ import annotations

import pytest

from tests import own_process, tiny_models
from tests.neural_speed_run import CASES, run_cases

pytestmark = pytest.mark.timeout(own_process.RUN_TIMEOUT_S + 60)  # the first case's time includes the run of them all


@pytest.fixture(scope="module")
def cases_run(background, tmp_path_factory, embedded_model, int8_cache_root) -> own_process.Run:
    """All cases in one child pytest, started with the session where it runs this file (tests/conftest.py)."""
    return background.result("neural_speed_cases", lambda: run_cases(tmp_path_factory, embedded_model, int8_cache_root))


@pytest.mark.parametrize("case", own_process.case_names(CASES))
def test_neural_speed_case(cases_run, case):
    kind, text = own_process.report(cases_run, case)
    if kind == "skipped":
        # the Qwen cases need ../shared/model-code (they skip with that reason where it is absent); nothing else skips
        if tiny_models.model_code_missing() is None:
            pytest.fail(f"{case} skipped though ../shared/model-code is present: {text}", pytrace=False)
        pytest.skip(text.strip())
