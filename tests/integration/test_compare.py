"""The compare tool against the real bundle (embedded model), with a small question set."""
from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.conftest import API_KEYS, SERVED_FP32, SERVED_INT8
from tests.helpers import ROOT, bundle_env

SMALL_SET = {"sets": [{"id": "small", "title": "Small set", "questions": [
    {"id": "capital", "text": "What is the capital of France?", "check": {"kind": "contains_any", "expect": ["Paris"]}},
    {"id": "seating", "text": "Five people A, B, C, D, E sit in a row. Give their order.",
     "check": {"kind": "seating_constraints", "people": ["A", "B", "C", "D", "E"], "satisfiable": True,
               "constraints": [{"at": "E", "seat": 5}]}},
    {"id": "cpp", "text": "Write a C++ function bool canPartition(std::vector<int>& nums).",
     "check": {"kind": "cpp_function", "function": "bool canPartition(std::vector<int>& nums)",
               "cases": [{"input": [1, 1], "expect": True}]}},
]}]}


def compare(served_bundle, tmp_path, *extra):
    questions = tmp_path / "small.yaml"
    questions.write_text(yaml.safe_dump(SMALL_SET))
    return subprocess.run(
        [sys.executable, "-m", "workers.tools.compare", "--profile", served_bundle["conf"], "--questions", str(questions),
         "--max-tokens", "24", "--out", str(tmp_path / "report"), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=bundle_env(BUNDLE_VAR_DIR=str(tmp_path), BUNDLE_TEST_API_KEYS=",".join(API_KEYS)))


def test_compare_writes_side_by_side_report_and_resumes(served_bundle, tmp_path):
    first = compare(served_bundle, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    lines = (tmp_path / "report" / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 6 and {r["model"] for r in records} == {SERVED_INT8, SERVED_FP32}
    for r in records:
        assert r["error"] is None and r["answer"] and r["ttft_s"] > 0 and r["total_s"] >= r["ttft_s"]
        assert r["tokens"] > 0 and r["finish_reason"] in ("stop", "length") and r["check"]["kind"]
    capital = [r for r in records if r["question_id"] == "capital"]
    assert all(r["check"]["passed"] for r in capital)

    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Summary" in md and f"| {SERVED_FP32} | 3 |" in md and "### capital" in md
    assert f"| {SERVED_FP32} | {SERVED_INT8} |" in md  # answers side by side, one column per model
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<style>" in html
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    assert html.count("<table>") == 1 + 3

    # A rerun asks nothing again; --redo asks everything again.
    again = compare(served_bundle, tmp_path)
    assert again.returncode == 0 and "(6 already done)" in again.stderr
    assert len((tmp_path / "report" / "results.jsonl").read_text().splitlines()) == 6
    redo = compare(served_bundle, tmp_path, "--redo")
    assert redo.returncode == 0 and "(0 already done)" in redo.stderr
    assert len((tmp_path / "report" / "results.jsonl").read_text().splitlines()) == 6


def test_compare_refuses_unknown_model_and_unreachable_api(served_bundle, tmp_path):
    bad = compare(served_bundle, tmp_path, "--models", "nope")
    assert bad.returncode == 2 and "not served: nope" in bad.stderr
    down = compare(served_bundle, tmp_path, "--api", "http://127.0.0.1:9/v1")
    assert down.returncode == 1 and "does not answer" in down.stderr
