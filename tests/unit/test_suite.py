"""The suite itself: the fast lane runs first, and the `slow` marker is on every test it describes."""
from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_unit_lane_runs_before_the_integration_lane():
    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    assert ini["pytest"]["testpaths"].split() == ["tests/unit", "tests/integration"]


def test_not_slow_leaves_out_integration_tests_and_quantizing_ones():
    files = ["tests/integration/test_api_contract.py", "tests/unit/test_batching.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "not slow", *files], cwd=ROOT, capture_output=True, text=True, timeout=300)
    chosen = [line for line in proc.stdout.splitlines() if "::" in line]
    assert chosen, proc.stdout + proc.stderr
    assert not [t for t in chosen if t.startswith("tests/integration/")], chosen
    assert not [t for t in chosen if "int8" in t], chosen  # test_batching's qbits test quantizes
