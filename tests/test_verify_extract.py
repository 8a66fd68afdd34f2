"""Answer extraction from whole completions (the `boxed` and `lenient` policies)."""

from __future__ import annotations

import pytest

from ssb.verify import Extraction, extract_answer
from ssb.verify.extract import as_fraction, clean_answer, extract_or_whole

SMOL_HASH = """Janet's ducks lay 16 eggs per day.
She eats 3 for breakfast and uses 4 for muffins, so 16 - 3 - 4 = 9 eggs are left.
She sells them at $2 each: 9 * 2 = 18.
#### 18"""

SMOL_ANSWER_IS = """To find the total, we add the two amounts.
48 + 24 = 72
So Natalia sold 72 clips in April and May.

The answer is: 72."""

BOXED_NESTED = r"""We solve $x^2 + x - 2 = 0$ by factoring: $(x+2)(x-1) = 0$.
So the roots are $x = 1$ and $x = -2$. Earlier I wrote \boxed{3} by mistake.

Therefore the solution set is $\boxed{\{1, -2\}}$, and the sum of the roots is $-1$."""

BOXED_FRAC = r"""The probability is the number of good outcomes over all outcomes:
$$P = \frac{3}{6} = \frac{1}{2}.$$
**Final Answer:** $\boxed{\dfrac{1}{2}}$"""

TRUNCATED_BOX = r"""Adding these up gives 12 + 30 = 42.
The answer is 42.
So the final answer is \boxed{4"""

FINAL_ANSWER = r"""First compute the area: $A = \pi r^2 = 9\pi$.
Then the circumference is $6\pi$.
Final answer: $3\sqrt{2}$"""

LAST_NUMBER = """Tom starts with 15 pencils and gives away 6.
15 - 6 = 9
Then he buys 3/4 of a dozen, which is 9 more.
So he has 18"""

UNITS = """Each box holds 6 apples and there are 7 boxes.
6 * 7 = 42
The answer is 42 apples. I hope this helps!"""

CURRENCY = """She earns $12 an hour for 1.5 hours.
12 * 1.5 = 18
The answer is: $18."""

FBOX = r"""Hence the value is \fbox{$-\frac{3}{8}$} as required."""

BARE_BOX = r"""so we get \boxed 5 and we are done."""

NESTED_TEXT = r"""Only choice C works.
The final answer is $\boxed{\text{(C)}}$."""

MARKDOWN = """**Step 1:** 3 + 4 = 7
**Step 2:** 7 * 2 = 14

**Answer:** 14"""

THAT_PROSE = """The answer is that Tom has 5 apples left after lunch.
Later he ate one."""


@pytest.mark.parametrize(
    "text, policy, want",
    [
        (SMOL_HASH, "lenient", Extraction("18", "hash")),
        (SMOL_HASH, "boxed", Extraction(None, None)),
        (SMOL_ANSWER_IS, "lenient", Extraction("72", "answer_is")),
        (BOXED_NESTED, "lenient", Extraction("\\{1, -2\\}", "boxed")),
        (BOXED_NESTED, "boxed", Extraction("\\{1, -2\\}", "boxed")),
        (BOXED_FRAC, "boxed", Extraction("\\dfrac{1}{2}", "boxed")),
        (TRUNCATED_BOX, "lenient", Extraction("42", "answer_is")),
        (TRUNCATED_BOX, "boxed", Extraction(None, None)),
        (FINAL_ANSWER, "lenient", Extraction("3\\sqrt{2}", "answer_is")),
        (LAST_NUMBER, "lenient", Extraction("18", "last_number")),
        (UNITS, "lenient", Extraction("42", "answer_is")),
        (CURRENCY, "lenient", Extraction("18", "answer_is")),
        (FBOX, "boxed", Extraction("-\\frac{3}{8}", "boxed")),
        (BARE_BOX, "boxed", Extraction("5", "boxed")),
        (NESTED_TEXT, "lenient", Extraction("(C)", "boxed")),
        (MARKDOWN, "lenient", Extraction("14", "answer_is")),
        (THAT_PROSE, "lenient", Extraction("5", "answer_is")),
        ("I cannot solve this.", "lenient", Extraction(None, None)),
        ("", "lenient", Extraction(None, None)),
    ],
)
def test_extract_from_completions(text, policy, want):
    assert extract_answer(text, policy) == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("The answer is 42 apples.", "42"),
        ("The answer is: $18.", "18"),
        ("The final answer is $\\frac{5}{2}$.", "\\frac{5}{2}"),
        ("The answer is \\$18.90.", "18.90"),
        ("The answer is 5 \\text{ cents}.", "5"),
        ("The answer is 90^\\circ.", "90^\\circ"),
        ("The answer is -7.", "-7"),
        ("The answer is 3.5.", "3.5"),
        ("The answer is $x = 5$ because it works.", "x = 5"),
        ("Final Answer: The final answer is 1,234. I hope it is correct.", "1,234"),
        ("the answer = 12", "12"),
        ("#### $1,000", "1,000"),
        ("... = 7\n#### 7\n", "7"),
        ("so it is \\frac{3}{4}", "\\frac{3}{4}"),
        ("she has 3/4 left", "3/4"),
        ("the balance is 1,234.50 after all", "1,234.50"),
        ("Subtract: 10-5", "5"),
        ("The temperature fell to -4", "-4"),
    ],
)
def test_lenient_spans(text, want):
    assert extract_answer(text).answer == want


def test_last_boxed_wins_and_braces_are_matched():
    text = r"First \boxed{1}, then \boxed{\frac{a^{2}}{b_{1}}} and text {with braces}."
    assert extract_answer(text, "boxed") == Extraction("\\frac{a^{2}}{b_{1}}", "boxed")


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown extraction policy"):
        extract_answer("42", "strict")


@pytest.mark.parametrize(
    "text, want",
    [
        ("(3,4]", Extraction("(3,4]", "whole")),  # not cut down to its last number
        ("\\{1\\pm\\sqrt{5},-2\\}", Extraction("\\{1\\pm\\sqrt{5},-2\\}", "whole")),
        ("42 apples", Extraction("42", "whole")),
        ("$18.", Extraction("18", "whole")),
        ("The answer is 7.", Extraction("7", "answer_is")),
        ("so we add them up and get 12", Extraction("12", "last_number")),
        ("no idea at all", Extraction("no idea at all", "whole")),
        ("I think 42", Extraction("42", "last_number")),
        ("1/2 cup", Extraction("1/2", "whole")),
        ("2k+2", Extraction("2k+2", "whole")),
        ("Evelyn", Extraction("Evelyn", "whole")),
    ],
)
def test_extract_or_whole(text, want):
    assert extract_or_whole(text) == want


@pytest.mark.parametrize(
    "span, want",
    [
        ("$\\text{(C)}$.", "(C)"),
        ("**42**", "42"),
        ("\\(\\frac{1}{2}\\)", "\\frac{1}{2}"),
        ("18 dollars per day.", "18"),
        ("2 pi", "2 pi"),
        ("\\textbf{east}", "east"),
        ("  \u22125 ", "-5"),
    ],
)
def test_clean_answer(span, want):
    assert clean_answer(span) == want


@pytest.mark.parametrize(
    "s, want",
    [
        ("2,125", 2125),
        ("025", 25),
        ("27.0", 27),
        ("-3/4", -0.75),
        ("\\frac12", 0.5),
        ("\\dfrac{-3}{4}", -0.75),
        ("\\$1{,}000", 1000),
        ("10,\\!080", 10080),
        (".5", 0.5),
        ("1,2", None),
        ("3/0", None),
        ("x", None),
        ("1e5", None),
    ],
)
def test_as_fraction(s, want):
    got = as_fraction(s)
    assert (got is None and want is None) or got == want
