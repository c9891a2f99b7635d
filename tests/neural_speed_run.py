"""The neural-speed cases (tests/integration/neural_speed_cases.py) in a pytest process of their own, and their
outcomes case by case (tests/integration/test_neural_speed.py says why they get their own process)."""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "integration" / "neural_speed_cases.py"
PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
RUN_TIMEOUT_S = 2400  # all the cases, on a busy 2-core machine


@dataclass
class Run:
    outcomes: dict[str, tuple[str, str]]  # name -> ("passed" | "failed" | "skipped", what the report says)
    tail: str


def run_cases(tmp_path_factory, embedded_model: Path, int8_cache_root: Path) -> Run:
    """All cases in one child pytest. It shares this session's INT8 cache, where the embedded model's entry is built
    first (the cases check that entry itself; quantizing it again would only cost minutes)."""
    from workers.config.int8 import Int8Settings
    from workers.engine import int8_cache

    int8_cache.ensure(embedded_model, Int8Settings(), int8_cache_root)
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
