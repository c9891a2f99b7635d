"""Run the check a question describes, by its `kind`."""
from __future__ import annotations

from workers.tools.checks import contains, cpp, seating
from workers.tools.checks.result import CheckResult

RUNNERS = {"contains_any": contains.check, "seating_constraints": seating.check, "cpp_function": cpp.check}


def run(check, answer: str) -> CheckResult:
    return RUNNERS[check.kind](check, answer)
