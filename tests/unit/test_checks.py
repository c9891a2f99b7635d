"""The compare tool's automatic checkers, on known-good and known-bad answers."""
from __future__ import annotations

import pytest

from workers.tools import questions
from workers.tools.checks import runner as checks
from workers.tools.checks import seating

SETS = {q.id: q for s in questions.load() for q in s.questions}
CPP = SETS["knowledge-5"].check
SEATING = SETS["knowledge-4"].check
CONTAINS = SETS["wordplay-4"].check

DP = """下面是动态规划的解法：
```cpp
#include <vector>
#include <numeric>
bool canPartition(std::vector<int>& nums) {
    int sum = std::accumulate(nums.begin(), nums.end(), 0);
    if (sum % 2) return false;
    int target = sum / 2;
    std::vector<bool> dp(target + 1, false);
    dp[0] = true;
    for (int x : nums)
        for (int s = target; s >= x; --s)
            dp[s] = dp[s] || dp[s - x];
    return dp[target];
}

int main() { std::vector<int> v{1, 5, 11, 5}; return canPartition(v) ? 0 : 1; }
```
时间复杂度 O(n*sum)。"""

LEETCODE_CLASS = """```c++
class Solution {
public:
    bool canPartition(vector<int>& nums) {
        int sum = 0; for (int x : nums) sum += x;
        if (sum & 1) return false;
        bitset<20001> bits(1);
        for (int x : nums) bits |= bits << x;
        return bits[sum / 2];
    }
};
```"""

GREEDY = """```cpp
#include <vector>
#include <algorithm>
bool canPartition(std::vector<int>& nums) {
    std::sort(nums.rbegin(), nums.rend());
    long a = 0, b = 0;
    for (int x : nums) { if (a <= b) a += x; else b += x; }
    return a == b;
}
```"""

NOT_COMPILING = """```cpp
bool canPartition(std::vector<int>& nums) {
    return undefined_helper(nums) +;
}
```"""

ENDLESS = """```cpp
bool canPartition(std::vector<int>& nums) {
    volatile long i = 0;
    while (true) { i++; }
    return false;
}
```"""


def test_question_sets_load_with_their_checks():
    assert {q.check.kind for q in SETS.values() if q.check} == {"contains_any", "seating_constraints", "cpp_function"}
    assert len(SETS) == 10


def test_correct_dp_solution_passes():
    r = checks.run(CPP, DP)
    assert r.passed and r.detail == "all 6 cases pass"


def test_leetcode_style_class_passes():
    assert checks.run(CPP, LEETCODE_CLASS).passed


def test_greedy_solution_fails_naming_the_case():
    r = checks.run(CPP, GREEDY)
    assert not r.passed and "[3, 3, 3, 4, 5]: got 0, expected 1" in r.detail


def test_code_that_does_not_compile_is_reported():
    r = checks.run(CPP, NOT_COMPILING)
    assert not r.passed and r.detail.startswith("does not compile:") and "undefined_helper" in r.detail


def test_endless_loop_hits_the_time_limit():
    r = checks.run(CPP, ENDLESS)
    assert not r.passed and ("time limit" in r.detail or "CPU time limit" in r.detail), r.detail


def test_no_code_in_answer():
    r = checks.run(CPP, "用动态规划即可，代码略。")
    assert not r.passed and "no C++ code defining canPartition()" in r.detail


def test_answer_code_has_no_network(tmp_path):
    probe = """```cpp
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>
bool canPartition(std::vector<int>& nums) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{}; a.sin_family = AF_INET; a.sin_port = htons(53); inet_pton(AF_INET, "1.1.1.1", &a.sin_addr);
    bool connected = connect(s, (sockaddr*)&a, sizeof a) == 0;
    close(s);
    return connected;  // "true" would mean the code reached the network
}
```"""
    r = checks.run(CPP, probe)
    assert "got 1" not in r.detail  # every case returns false: no network inside the sandbox


def test_seating_puzzle_has_no_solution_by_brute_force():
    assert seating.solutions(SEATING) == []


@pytest.mark.parametrize("answer", [
    "根据条件推理，这些条件互相矛盾，不存在满足所有条件的座位顺序。",
    "There is no solution: the constraints contradict each other.",
])
def test_seating_answer_saying_no_solution_passes(answer):
    assert checks.run(SEATING, answer).passed


def test_seating_answer_with_a_violating_order_fails_naming_the_constraint():
    r = checks.run(SEATING, "座位顺序是：C、A、D、B、E。")
    assert not r.passed
    assert r.detail == "states order C A D B E, which violates: D sits next to C"
    r = checks.run(SEATING, "The order is A B C D E.")
    assert r.detail == ("states order A B C D E, which violates: A is not in seat 1 or 5; "
                        "B sits right of A, not adjacent; C is not in seat 3")


def test_seating_answer_without_order_or_verdict_fails():
    assert not checks.run(SEATING, "这道题很有意思，需要仔细思考。").passed


def test_seating_valid_order_passes_when_the_puzzle_is_satisfiable():
    solvable = SEATING.model_copy(update={"satisfiable": True, "constraints": SEATING.constraints[:4]})
    order = seating.solutions(solvable)[0]
    r = checks.run(solvable, f"答案：{' -> '.join(order)}")
    assert r.passed and "valid order" in r.detail


def test_seating_data_mismatch_is_reported():
    wrong = SEATING.model_copy(update={"satisfiable": True})
    assert "question data error" in checks.run(wrong, "无解").detail


def test_contains_any():
    assert checks.run(CONTAINS, "所以是 白白 喜欢 明明。").passed
    r = checks.run(CONTAINS, "明明喜欢白白。")
    assert not r.passed and "contains none of" in r.detail


def test_invalid_question_file_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sets:\n  - id: s\n    title: t\n    questions:\n      - id: q\n        text: x\n        check: {kind: regex}\n")
    with pytest.raises(questions.QuestionsError, match=r"bad.yaml: sets\[0\]\.questions\[0\]\.check: "):
        questions.load([bad])
