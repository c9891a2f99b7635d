"""seating_constraints: brute-force the puzzle, then judge the answer.

An answer passes when it states a valid order, or, when no order exists, says there is none.
An answer that states an order violating the constraints fails, naming the violated constraint.
"""
from __future__ import annotations

import itertools
import re

from workers.tools.checks.result import CheckResult

NO_SOLUTION = ("无解", "没有解", "不存在", "没有满足", "无法满足", "不可能", "矛盾", "没有符合", "无法确定",
               "no solution", "no valid", "impossible", "contradict", "cannot be satisfied", "not possible")


def describe(c) -> str:
    if c.at is not None:
        return f"{c.at} sits in seat {c.seat}"
    if c.not_at is not None:
        return f"{c.not_at} is not in seat {' or '.join(map(str, c.seats))}"
    if c.right_of is not None:
        adj = "" if c.adjacent is None else (", directly" if c.adjacent else ", not adjacent")
        return f"{c.right_of} sits right of {c.of}{adj}"
    return f"{c.next_to} sits next to {c.of}"


def holds(c, seat: dict[str, int]) -> bool:
    if c.at is not None:
        return seat[c.at] == c.seat
    if c.not_at is not None:
        return seat[c.not_at] not in c.seats
    if c.right_of is not None:
        gap = seat[c.right_of] - seat[c.of]
        if gap <= 0:
            return False
        return c.adjacent is None or (gap == 1) == c.adjacent
    return abs(seat[c.next_to] - seat[c.of]) == 1


def solutions(spec) -> list[tuple[str, ...]]:
    found = []
    for order in itertools.permutations(spec.people):
        seat = {p: i + 1 for i, p in enumerate(order)}
        if all(holds(c, seat) for c in spec.constraints):
            found.append(order)
    return found


def stated_orders(spec, answer: str) -> list[tuple[str, ...]]:
    """Every run of all the people, each once, separated only by spaces, punctuation or arrows."""
    names = "|".join(re.escape(p) for p in sorted(spec.people, key=len, reverse=True))
    sep = r"[\s,，、\-–—>→|/;；:：]*"
    pattern = re.compile(rf"(?<![A-Za-z])((?:{names}){sep}){{{len(spec.people) - 1}}}(?:{names})(?![A-Za-z])")
    orders = []
    for m in pattern.finditer(answer):
        seq = tuple(re.findall(names, m.group(0)))
        if sorted(seq) == sorted(spec.people) and seq not in orders:
            orders.append(seq)
    return orders


def check(spec, answer: str) -> CheckResult:
    valid = solutions(spec)
    if bool(valid) != spec.satisfiable:
        return CheckResult(False, f"question data error: brute force finds {len(valid)} solution(s) "
                                  f"but the set says satisfiable={spec.satisfiable}")
    orders = stated_orders(spec, answer)
    for order in orders:
        seat = {p: i + 1 for i, p in enumerate(order)}
        broken = [describe(c) for c in spec.constraints if not holds(c, seat)]
        if broken:
            return CheckResult(False, f"states order {' '.join(order)}, which violates: {'; '.join(broken)}")
    if orders:
        return CheckResult(True, f"states a valid order {' '.join(orders[0])}")
    says_none = any(p in answer.lower() for p in NO_SOLUTION)
    if not valid:
        return (CheckResult(True, "says there is no valid order (correct: the constraints contradict)") if says_none
                else CheckResult(False, "states no order and does not say that none exists"))
    return CheckResult(False, f"states no order; a valid one exists, e.g. {' '.join(valid[0])}")
