"""Symbolic answer equivalence: math-verify plus our guards where it is known to be wrong.

`compare(pred, gold)` parses both answers with math-verify and decides equivalence. It can take
unbounded time (sympy on `5^{5^{5^5}}`), so `ssb.verify` only runs it inside the worker processes of
`ssb.verify.worker`, which enforce a per-item deadline (math-verify's own `signal.alarm` timeout is
switched off: it fails outside the main thread and does not stop every input).

Guards on top of math-verify 0.9 (behaviour checked against that release):
- numbers without symbols are decided by us, exactly: rationals (decimal literals included, read
  exactly from their digits) compare with `==`, so `1/2^98 != 1/2^99` and `2*10^-20 != 10^-20`
  (math-verify's `evalf(chop=True)` rounds tiny differences to zero). Exact irrationals compare at
  60 significant digits; a decimal against an irrational (`1.414214` vs `\\sqrt2`) needs the same
  6 decimal places math-verify uses *and* a relative error below 1e-6.
- when math-verify says "equal" for sets, tuples, matrices, intervals, relations or expressions
  with symbols, the numbers inside are re-checked with the rule above (random points for symbols).
- numerals with different base subscripts (`4343_3` vs `4343_6`) differ (math-verify drops them).
- LaTeX math-verify's normaliser truncates (`\\frac{1}{\\mathrm{e}}` -> `\\frac{1}{`, which made
  `1-1/e` equal `1+1/e`) is rewritten first, and a parse whose normalised text has unbalanced
  braces is rejected instead of trusted. `zoo`/`nan` parses (`12:00`) fall back to text equality.
"""

from __future__ import annotations

import functools
import logging
import random
import re

from ssb.verify.extract import brace_depth_ok

log = logging.getLogger(__name__)

_PRE = [
    (re.compile(r"\\(?:mathrm|text|textrm|operatorname)\s*\{\s*([ei])\s*\}"), r"\1"),  # Euler e, i
    (re.compile(r"\^\s*(-\s*\d+(?:\.\d+)?)"), r"^{\1}"),  # 10^-20 -> 10^{-20}
    (re.compile(r"(?<=\d)\s*\*\*\s*"), "^"),  # 2**10
    (re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)[eE]([-+]?\d+)(?![\w.])"), r"\1\\times 10^{\2}"),  # 1.5e3
    (re.compile(r"\u00b0"), r"^\\circ"),
    (re.compile(r"\u03c0"), r"\\pi "),
    (re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])"), r"\\pi "),  # "2 pi"
    (re.compile(r"\u221a"), r"\\sqrt"),
    (re.compile(r"\u00d7"), r"\\times "),
]


def _quiet_math_verify() -> None:
    # We switch math-verify's signal timeouts off on purpose (the pool enforces deadlines); its
    # warning about that, and its per-item timeout warnings, would only be noise.
    for name in ("math_verify.parser", "math_verify.grader", "math_verify.utils"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _prenormalize(s: str) -> str:
    s = s.replace("\u2212", "-").strip()
    for pattern, repl in _PRE:
        s = pattern.sub(repl, s)
    return s


@functools.lru_cache(maxsize=4096)  # golds repeat across a question's K rollouts; values are immutable
def parse_answer(answer: str):
    """The sympy value math-verify reads from one bare answer string, or None if it cannot parse it."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from sympy import Basic, MatrixBase, nan, zoo

    _quiet_math_verify()
    text = _prenormalize(answer)
    if not text or not brace_depth_ok(text):
        return None
    # Wrapped in \boxed{} so math-verify reads the whole answer (a bare `1,-2` parses as `1`).
    found = parse("\\boxed{" + text + "}", [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
    if not found or not isinstance(found[0], (Basic, MatrixBase)):
        return None
    if len(found) > 1 and isinstance(found[1], str) and not brace_depth_ok(found[1]):
        return None  # the normaliser cut the answer short; the value is not the answer's
    value = found[0]
    if isinstance(value, Basic) and value.has(zoo, nan):
        return None
    return value


_BASE_RE = re.compile(r"^([0-9A-Za-z]+)_\{?(\d+)\}?$")  # a numeral in base b: 2516_8, 4210_{5}
_PROSE_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}[,;]?\s+[A-Za-z]{2,}")


def _text_key(s: str) -> str:
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", s)
    return re.sub(r"[\s$(){}]|\\[,!;]", "", s).lower()


def compare(pred: str, gold: str) -> str:
    """'correct' / 'incorrect' / 'unparsed' for two bare answers. May take unbounded time."""
    from math_verify import verify

    if _PROSE_RE.search(re.sub(r"\\[A-Za-z]+\s*\{[^{}]*\}", " ", pred)):
        # Two English words in a row are not an answer (math-verify would read "no answer" as
        # the product n*o*a*n*s*w*e*r): only an exact text match counts.
        return "correct" if _text_key(pred) == _text_key(gold) else "unparsed"
    pb, gb = _BASE_RE.match(pred.strip()), _BASE_RE.match(gold.strip())
    if pb and gb and pb.group(2) != gb.group(2):  # math-verify drops subscripts: 4343_3 == 4343_6
        return "incorrect"
    try:
        g, p = parse_answer(gold), parse_answer(pred)
    except RecursionError:
        return "unparsed"
    if p is None or g is None:  # compare as text; a prediction that neither parses nor matches is unparsed
        if _text_key(pred) and _text_key(pred) == _text_key(gold):
            return "correct"
        return "unparsed" if p is None else "incorrect"
    try:
        decided = _numbers_equal(g, p)
        if decided is None:
            decided = bool(verify(g, p, timeout_seconds=None)) and _recheck(g, p) is not False
    except Exception as e:  # noqa: BLE001 - sympy raises many types; math-verify counts these False too
        log.debug("comparison failed (%s): counted incorrect", type(e).__name__)
        decided = False
    return "correct" if decided else "incorrect"


# ------------------------------------------------------------------------------- numeric guards
def _pct_parts(x):
    """(value, is_percentage) for latex2sympy's `X%` form `X*UnevaluatedExpr(1/100)`."""
    from sympy import Mul, Rational, UnevaluatedExpr

    if isinstance(x, Mul) and len(x.args) == 2 and x.args[1] == UnevaluatedExpr(Rational(1, 100)):
        return x.args[0], True
    return x, False


def _is_scalar(x) -> bool:
    from sympy import Expr

    return isinstance(x, Expr) and not x.free_symbols and not x.is_Relational


def _unwrap_assignment(g, p):
    """`x = 5` vs `5`: compare the right-hand side (math-verify's rule: follow the gold's form)."""
    from sympy import Eq, Symbol

    def rhs(e):
        return e.rhs if isinstance(e, Eq) and isinstance(e.lhs, Symbol) else None

    if rhs(p) is not None and not isinstance(g, Eq):
        p = rhs(p)
    elif rhs(g) is not None and not isinstance(p, Eq):
        g = rhs(g)
    return g, p


def _numbers_equal(g, p):
    """Our decision when both answers are numbers without symbols; None to defer to math-verify."""
    g, p = _unwrap_assignment(g, p)
    (gv, g_pct), (pv, p_pct) = _pct_parts(g), _pct_parts(p)
    if not (_is_scalar(gv) and _is_scalar(pv)):
        return None
    from sympy import Rational

    # 25% matches 25 and 0.25 (math-verify's rule); without a % sign 25 and 0.25 differ.
    g_opts = [gv, gv * Rational(1, 100)] if g_pct else [gv]
    p_opts = [pv, pv * Rational(1, 100)] if p_pct else [pv]
    return any(_scalar_eq(a, b) for a in g_opts for b in p_opts)


def _exact(x):
    """x with every Float replaced by the exact rational its decimal digits spell; had-floats flag."""
    from sympy import Float, Rational

    floats = x.atoms(Float)
    if not floats:
        return x, False
    return x.xreplace({f: Rational(str(f)) for f in floats}), True


def _scalar_eq(a, b) -> bool:
    from sympy import N, oo, zoo

    (a, a_float), (b, b_float) = _exact(a), _exact(b)
    a, b = a.doit(), b.doit()
    if a.is_Rational and b.is_Rational:
        return a == b  # exact: integers, fractions, decimals
    if a.has(oo, -oo, zoo) or b.has(oo, -oo, zoo):
        return a == b
    x, y = N(a, 60), N(b, 60)
    if not (x.is_number and y.is_number):
        return False
    diff, scale = abs(x - y), max(abs(x), abs(y))
    if diff == 0:
        return True
    if a_float or b_float:  # a decimal approximating an irrational: 6 places and 1e-6 relative
        return bool(diff <= 1e-6 * scale) and _round6(x) == _round6(y)
    return bool(diff <= 1e-45 * scale)


def _round6(x):
    from sympy import im
    from sympy import re as real

    return (round(float(real(x)), 6), round(float(im(x)), 6))


def _recheck(g, p):
    """After math-verify said equal: False if a number inside differs by our exact rules."""
    from sympy import Expr, FiniteSet, Interval, MatrixBase, N, Rational, Tuple
    from sympy.core.relational import Relational

    g, p = _unwrap_assignment(g, p)
    if _is_scalar(g) and _is_scalar(p):
        return _scalar_eq(g, p)
    if isinstance(g, FiniteSet) and isinstance(p, FiniteSet):
        left = list(p.args)
        for x in g.args:  # each gold element needs its own matching prediction element
            hit = next((y for y in left if _recheck(x, y) is not False), None)
            if hit is None:
                return False
            left.remove(hit)
        return None
    if isinstance(g, (Tuple, MatrixBase)) and isinstance(p, type(g)):
        gs, ps = (list(g), list(p)) if isinstance(g, MatrixBase) else (g.args, p.args)
        if len(gs) == len(ps) and any(_recheck(x, y) is False for x, y in zip(gs, ps)):
            return False
        return None
    if isinstance(g, Interval) and isinstance(p, Interval):
        if (g.left_open, g.right_open) != (p.left_open, p.right_open):
            return False
        return False if _recheck(g.start, p.start) is False or _recheck(g.end, p.end) is False else None
    if isinstance(g, Relational) and isinstance(p, Relational) and type(g) is type(p):
        if g.lhs == p.lhs:
            return _recheck(g.rhs, p.rhs)
        return None
    if (
        isinstance(g, Expr)
        and isinstance(p, Expr)
        and g.free_symbols
        and g.free_symbols == p.free_symbols
        and not (g.is_Symbol or p.is_Symbol)
    ):
        symbols = sorted(g.free_symbols, key=str)
        rng = random.Random(0)
        for _ in range(3):  # exact rational points: chop-free, so x/2^98 and x/2^99 differ
            point = {s: Rational(rng.randint(2, 97), rng.randint(2, 13)) for s in symbols}
            x, y = N(g.subs(point), 60), N(p.subs(point), 60)
            if x.is_number and y.is_number and x.is_finite and y.is_finite:
                if abs(x - y) > 1e-30 * max(abs(x), abs(y), 1e-300):
                    return False
        return None
    return None
