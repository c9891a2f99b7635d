"""The neural-speed runtime's tests (neural_speed_cases.py), run by pytest in a process of their own and
reported here one by one.

neural-speed and ITREX's qbits both embed the bestla kernels under the same symbols; in a process
that had loaded qbits models (earlier tests of this suite), neural-speed segfaulted. A serving worker
runs one INT8 runtime (threads.apply_to_torch never loads qbits next to neural-speed), so the tests
of neural-speed get a process of their own too: it runs them all once (its outcomes read from its JUnit
XML report), and each case is a test of this file that passes, fails or skips as it did there.
"""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import tiny_models

ROOT = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("neural_speed_cases.py")
PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
RUN_TIMEOUT_S = 2400  # all the cases, on a busy 2-core machine

pytestmark = pytest.mark.timeout(RUN_TIMEOUT_S + 60)  # the first case's time includes the run of them all


def case_names() -> list[str]:
    """The cases' test names (with their parameters), as pytest collects them in a process of their own."""
    proc = subprocess.run([*PYTEST, "-q", "--collect-only", str(CASES)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    names = [line.split("::", 1)[1] for line in proc.stdout.splitlines() if line.startswith("tests/") and "::" in line]
    return names or [f"collecting {CASES.name} failed: {(proc.stdout + proc.stderr)[-3000:]}"]


@dataclass
class Run:
    outcomes: dict[str, tuple[str, str]]  # name -> ("passed" | "failed" | "skipped", what the report says)
    tail: str


@pytest.fixture(scope="module")
def cases_run(tmp_path_factory, int8_entry, int8_cache_root) -> Run:
    """All cases in one child pytest; it shares this session's INT8 cache, where the embedded model's entry is
    built already (the cases check that entry itself; quantizing it again would only cost minutes)."""
    tmp = tmp_path_factory.mktemp("neural-speed")
    report = tmp / "report.xml"
    proc = subprocess.run([*PYTEST, "-v", "--basetemp", str(tmp / "basetemp"), f"--junitxml={report}", str(CASES)],
                          cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          env={**os.environ, "BUNDLE_TEST_INT8_CACHE": str(int8_cache_root)})
    tail = f"exit code {proc.returncode}\n{proc.stdout[-6000:]}{proc.stderr[-3000:]}"
    outcomes = {}
    # -v writes each outcome as its case ends: what a process that crashed had finished is kept
    for line in proc.stdout.splitlines():
        name, _, rest = line.partition("::")[2].partition(" ")
        word = rest.split(" ")[0] if rest else ""
        if name and word in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            kind = {"PASSED": "passed", "SKIPPED": "skipped"}.get(word, "failed")
            outcomes[name] = (kind, f"{word} (its report is lost: the process ended early, {tail})")
    if report.exists():  # the reasons and failure texts
        for case in ET.parse(report).getroot().iter("testcase"):
            found = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            if found is None:
                outcomes[case.get("name")] = ("passed", "")
            else:
                kind = "skipped" if found.tag == "skipped" else "failed"
                outcomes[case.get("name")] = (kind, found.get("message", "") + "\n" + (found.text or ""))
    return Run(outcomes, tail)


@pytest.mark.parametrize("case", case_names())
def test_neural_speed_case(cases_run, case):
    if case not in cases_run.outcomes:
        pytest.fail(f"{case} has no outcome: its process ended at or before it ({cases_run.tail})", pytrace=False)
    kind, text = cases_run.outcomes[case]
    if kind == "skipped":
        # the Qwen cases need ../shared/model-code (they skip with that reason where it is absent); nothing else skips
        if tiny_models.model_code_missing() is None:
            pytest.fail(f"{case} skipped though ../shared/model-code is present: {text}", pytrace=False)
        pytest.skip(text.strip())
    if kind == "failed":
        pytest.fail(text, pytrace=False)
