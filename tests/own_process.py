"""Test modules run by pytest in a process of their own, and their outcomes reported here case by case.

A module gets a process of its own for one of two reasons: it must not share the suite's process
(tests/integration/test_neural_speed.py says why for neural-speed), or it keeps about one of the two cores busy and
can run beside the rest of the integration lane (tests/integration/test_fidelity.py). Each case of such a module is a
test of its proxy file that passes, fails with that case's own failure text, or skips with its reason, as it did in
that process; a case the process never reached (it crashed) fails naming the process's exit and output."""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
RUN_TIMEOUT_S = 2400  # a module of cases, on a busy 2-core machine


@dataclass
class Run:
    outcomes: dict[str, tuple[str, str]]  # name -> ("passed" | "failed" | "skipped", what the report says)
    tail: str


def case_names(cases: Path) -> list[str]:
    """The cases' test names (with their parameters), as pytest collects them in a process of their own."""
    proc = subprocess.run([*PYTEST, "-q", "--collect-only", str(cases)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    names = [line.split("::", 1)[1] for line in proc.stdout.splitlines() if line.startswith("tests/") and "::" in line]
    return names or [f"collecting {cases.name} failed: {(proc.stdout + proc.stderr)[-3000:]}"]


def run(cases: Path, tmp_path_factory, int8_cache_root: Path) -> Run:
    """All cases of `cases` in one child pytest. It shares this session's INT8 cache (BUNDLE_TEST_INT8_CACHE), so
    it finds the entries this session built instead of quantizing them again."""
    tmp = tmp_path_factory.mktemp(cases.stem)
    report = tmp / "report.xml"
    proc = subprocess.run([*PYTEST, "-v", "--basetemp", str(tmp / "basetemp"), f"--junitxml={report}", str(cases)],
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


def report(done: Run, case: str) -> tuple[str, str]:
    """Fail here as `case` failed there (or never ran); otherwise its kind ("passed" or "skipped") and text."""
    if case not in done.outcomes:
        pytest.fail(f"{case} has no outcome: its process ended at or before it ({done.tail})", pytrace=False)
    kind, text = done.outcomes[case]
    if kind == "failed":
        pytest.fail(text, pytrace=False)
    return kind, text
