"""Built-in generator of arithmetic word problems: the embedded default dataset.

Level 1 problems take one operation (+, -, x, /) on small numbers, level 2 two chained steps, level 3 three.
Train and test sets are disjoint by construction: a problem's split is decided by a hash of its operations and
numbers (operands of + and x in either order count as one), so no test problem shares its arithmetic with a
training problem, whatever the seeds or sizes. Within a split, the same arithmetic can come back in another
wording or with another item (level 1 has 215 such calculations, 118 of them in training and 97 in test, which
make 3,376 and 2,784 distinct problems); names alone never make a problem new.

Validation: two more splits carve a validation slice out of the training calculations (never the test ones), so
settings can be chosen without looking at the test split: `val` holds the problems of one training calculation in
`VAL_SHARE` (chosen by a second hash), `fit` the problems of the other training calculations. `val` and `fit` are
disjoint by calculation, and together they are exactly `train`'s calculations. Choose settings by training on
`fit` and evaluating on `val`; then train on `train` and evaluate once on `test` (docs/quality.md).
Generation is seeded and deterministic; ids are content hashes, stable across runs.

    >>> [p.answer for p in generate("train", level=1, n=2, seed=0)] == [p.answer for p in generate("train", 1, 2, 0)]
    True
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

NAMES = [
    "Ava",
    "Ben",
    "Carla",
    "Dev",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jamal",
    "Kira",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Pablo",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
    "Wen",
    "Yara",
    "Zoe",
]
ITEMS = [
    "apples",
    "marbles",
    "stickers",
    "books",
    "pencils",
    "cookies",
    "stamps",
    "shells",
    "cards",
    "coins",
    "balloons",
    "crayons",
    "eggs",
    "flowers",
    "toy cars",
    "beads",
]
CONTAINERS = ["boxes", "bags", "baskets", "jars", "packs", "crates"]
TEST_SHARE = 2  # one calculation in two belongs to the test split
VAL_SHARE = 4  # one training calculation in four belongs to the validation slice (split "val")
SPLITS = ("train", "test", "val", "fit")


@dataclass(frozen=True)
class ArithProblem:
    id: str
    question: str
    answer: int
    level: int
    key: str  # operations and numbers: decides the split


def _split_of(key: str) -> str:
    return "test" if int(hashlib.sha256(key.encode()).hexdigest(), 16) % TEST_SHARE == 0 else "train"


def _in_split(key: str, split: str) -> bool:
    """Whether a calculation belongs to `split`: train/test by the first hash; val/fit subdivide train."""
    home = _split_of(key)
    if split in ("train", "test"):
        return home == split
    in_val = int(hashlib.sha256(f"val|{key}".encode()).hexdigest(), 16) % VAL_SHARE == 0
    return home == "train" and in_val == (split == "val")


# Each step maps (rng, current value or None) -> (sentence, key part, new value). Values stay positive integers.


def _start(rng: random.Random, name: str, item: str) -> tuple[str, str, int]:
    a = rng.randint(12, 95)
    return f"{name} has {a} {item}.", f"start{a}", a


def _add(rng, name, item, v):
    b = rng.randint(11, 89)
    verb = rng.choice(["buys", "finds", "is given", "wins"])
    return f"Then {name} {verb} {b} more {item}.", f"add{b}", v + b


def _sub(rng, name, item, v):
    if v < 14:
        return None
    b = rng.randint(5, v - 3)
    verb = rng.choice(["gives away", "loses", "sells", "uses"])
    return f"Then {name} {verb} {b} of the {item}.", f"sub{b}", v - b


def _mul(rng, name, item, v):
    if v > 99:
        return None
    b = rng.randint(3, 9)
    return f"Then {name} gets {b} times as many {item} as that in total.", f"mul{b}", v * b


def _div(rng, name, item, v):
    divisors = [d for d in range(2, 10) if v % d == 0 and v // d >= 2]
    if not divisors:
        return None
    b = rng.choice(divisors)
    return f"Then {name} shares them equally among {b} friends and keeps none.", f"div{b}", v // b


def _level1(rng: random.Random) -> tuple[str, str, int, str]:
    # One operation on numbers up to 5 or 10, in two wordings for +, - and x, chosen so that SmolLM2-135M-Instruct
    # at T=0.8, K=4 is right on roughly one rollout in eight and over a third of the questions are mixed (full run:
    # 14.7% and 110 of 256; README, "Results on this machine"; `benchmarks/arith_regime.py RUN` breaks a run down
    # by operation and size). An earlier version that also drew numbers up to 20 got 4.3% right on those (138
    # questions). Operands start at 2 so that every item stays plural.
    name, other = rng.sample(NAMES, 2)
    item, box = rng.choice(ITEMS), rng.choice(CONTAINERS)
    hi = rng.choice((5, 10))
    op, first = rng.choice("+-*/"), rng.random() < 0.5
    variant = f"{'ab'[first]}:{item}"
    if op == "+":
        a, b = rng.randint(2, hi), rng.randint(2, hi)
        q = (
            f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have in total?"
            if first
            else f"{name} has {a} {item} and {other} has {b} {item}. How many {item} do they have altogether?"
        )
        return q, f"1+{min(a, b)},{max(a, b)}", a + b, variant
    if op == "-":
        b, left = rng.randint(2, hi), rng.randint(2, hi)
        a = b + left
        q = (
            f"{name} has {a} {item}. {name} gives {b} {item} away. How many {item} are left?"
            if first
            else f"{name} had {a} {item} and lost {b} of them. How many {item} does {name} have left?"
        )
        return q, f"1-{a},{b}", left, variant
    if op == "*":
        a, b = rng.randint(2, min(hi, 9)), rng.randint(2, hi)
        q = (
            f"{name} buys {a} {box} of {item}. Each of the {box} holds {b} {item}. How many {item} does {name} buy?"
            if first
            else f"There are {a} {box} with {b} {item} in each. How many {item} are there in total?"
        )
        return q, f"1*{min(a, b)},{max(a, b)}", a * b, variant
    # Division in one wording: the other one tried ("shares them equally among b friends") was solved less than half
    # as often in an exploratory run.
    b, ans = rng.randint(2, min(hi, 6)), rng.randint(2, hi)
    q = f"{name} puts {ans * b} {item} into {b} equal groups. How many {item} are in each group?"
    return q, f"1/{ans * b},{b}", ans, f"a:{item}"


def _chain(rng: random.Random, steps: int) -> tuple[str, str, int, str] | None:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    text, key, v = _start(rng, name, item)
    parts, keys = [text], [key]
    for _ in range(steps):
        for _try in range(10):
            out = rng.choice([_add, _sub, _mul, _div])(rng, name, item, v)
            if out is not None:
                break
        else:
            return None
        sentence, k, v = out
        parts.append(sentence)
        keys.append(k)
    if v > 2000:
        return None
    ask = (
        f"How many {item} does each friend get?"
        if keys[-1].startswith("div")
        else f"How many {item} does {name} have now?"
    )
    return " ".join(parts + [ask]), f"{steps}:" + ",".join(keys), v, ""


def generate(split: str, level: int = 1, n: int = 100, seed: int = 0, offset: int = 0) -> list[ArithProblem]:
    """The first `offset + n` distinct problems of `split` for this seed and level, minus the first `offset`."""
    if split not in SPLITS:
        raise ValueError(f"arith split must be one of {', '.join(SPLITS)}, got {split!r}")
    if level not in (1, 2, 3):
        raise ValueError(f"arith level must be 1, 2 or 3, got {level!r}")
    rng = random.Random(f"ssb-arith-{seed}-{split}-{level}")
    seen: set[str] = set()
    out: list[ArithProblem] = []
    tries = 0
    while len(out) < offset + n:
        tries += 1
        if tries > 200 * (offset + n) + 10_000:
            raise ValueError(
                f"arith level {level} holds only {len(out)} distinct {split} problems, {offset + n} were "
                f"asked for (offset + limit): lower the dataset's limit"
            )
        made = _level1(rng) if level == 1 else _chain(rng, level)
        if made is None:
            continue
        question, key, answer, variant = made
        identity = f"{key}|{variant}" if variant else key  # what makes two problems the same, names aside
        if identity in seen or not _in_split(key, split):
            continue
        seen.add(identity)
        pid = f"arith-l{level}-" + hashlib.sha256(identity.encode()).hexdigest()[:10]
        out.append(ArithProblem(pid, question, answer, level, key))
    return out[offset:]
