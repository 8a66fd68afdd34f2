"""The arithmetic step checker and the looping test (ssb.verify.steps) on hand-written solutions."""

import pytest

from ssb.verify.steps import LOOP_CHARS, LOOP_LINES, check_steps, is_looping, step_stats


@pytest.mark.parametrize(
    "solution, expected",
    [
        ("Ava has 3 + 4 = 7 apples. So \\boxed{7}.", [("3 + 4 = 7", True)]),
        ("She gives away some: 12 - 5 = 8 are left.", [("12 - 5 = 8", False)]),
        ("There are 6 x 4 = 24 eggs and 24 / 3 = 8 per box.", [("6 * 4 = 24", True), ("24 / 3 = 8", True)]),
        ("\\( 7 \\times 8 = 54 \\)", [("7 * 8 = 54", False)]),
        ("$9 \\div 3 = 3$ and $2 \\cdot 5 = 10$", [("9 / 3 = 3", True), ("2 * 5 = 10", True)]),
        ("\\[ 18 ÷ 3 = 6 \\] and 4 × 4 = 16", [("18 / 3 = 6", True), ("4 * 4 = 16", True)]),
        # chains: each link is a step of its own
        ("3 + 4 = 7 + 2 = 9", [("3 + 4 = 7", True), ("7 + 2 = 9", True)]),
        ("3 + 4 = 7 + 2 = 10", [("3 + 4 = 7", True), ("7 + 2 = 10", False)]),
        # several operands, usual precedence
        ("2 + 3 + 4 = 9 and 2 + 3 * 4 = 14", [("2 + 3 + 4 = 9", True), ("2 + 3 * 4 = 14", True)]),
        ("2 + 3 * 4 = 20", [("2 + 3 * 4 = 20", False)]),
        # thousands commas; decimals; rounding to the decimals written
        ("1,200 + 300 = 1,500 coins", [("1,200 + 300 = 1,500", True)]),
        ("2.5 * 4 = 10.0 and 10 / 3 = 3.33", [("2.5 * 4 = 10.0", True), ("10 / 3 = 3.33", True)]),
        ("10 / 3 = 3", [("10 / 3 = 3", False)]),
        ("7 / 0 = 0", [("7 / 0 = 0", False)]),
        # a list comma is a separator, not part of a number
        ("We have 5, 3 + 4 = 7 more.", [("3 + 4 = 7", True)]),
        # steps equal to a boxed answer
        ("So 5 + 5 = \\boxed{10}", [("5 + 5 = 10", True)]),
        # not checked: brackets, a leading minus, no steps at all
        ("(2 + 3) x 4 = 20", []),
        ("-3 + 5 = 2", []),
        ("Ava has 7 apples and gets 2 more, so she has 9.", []),
        ("", []),
    ],
)
def test_check_steps(solution, expected):
    assert [(s.text, s.ok) for s in check_steps(solution)] == expected


def test_a_step_inside_a_longer_number_is_not_read_from_its_middle():
    assert [s.text for s in check_steps("12 + 3 = 15")] == ["12 + 3 = 15"]


def test_looping_needs_the_token_limit_and_a_repeated_end():
    loop = "Let me solve.\n" + "3 + 4 = 7\nSo the answer is 7.\n" * 5 + "So the ans"
    assert is_looping(loop, "length")
    assert not is_looping(loop, "stop")  # stopped on its own: repetitive, not looping
    fresh = "\n".join(f"Step {i}: {i} + 1 = {i + 1}" for i in range(2 * LOOP_LINES)) + "\ncut"
    assert not is_looping(fresh, "length")
    assert is_looping("The answer is " + "7 " * LOOP_CHARS, "length")  # no line breaks
    assert not is_looping("short", "length")


def test_step_stats_shares():
    samples = [
        {"text": "3 + 4 = 7, so \\boxed{7}", "finish_reason": "stop", "correct": True},
        {"text": "3 + 4 = 8, so \\boxed{7}", "finish_reason": "stop", "correct": True},  # right answer, wrong step
        {"text": "3 + 4 = 8, so \\boxed{8}", "finish_reason": "stop", "correct": False},
        {"text": "x\n" * (LOOP_LINES + 2) + "x", "finish_reason": "length", "correct": False},
    ]
    s = step_stats(samples)
    assert s["step_checked_share"] == 0.75
    assert s["wrong_step_share"] == 0.5
    assert s["correct_with_wrong_step_share"] == 0.25
    assert s["looping_share"] == 0.25
    assert (s["steps_checked"], s["steps_wrong"]) == (3, 2)
