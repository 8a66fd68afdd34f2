"""Built-in generator of arithmetic word problems: the embedded default dataset.

Level 1 problems take one operation (+, -, x, /), level 2 two chained steps, level 3 three. Train and test
sets are disjoint by construction: a problem's split is decided by a hash of its template and numbers, so no
test problem shares its arithmetic with a training problem, whatever the seeds or sizes. Generation is seeded
and deterministic; ids are content hashes, stable across runs.

    >>> [p.answer for p in generate("train", level=1, n=2, seed=0)] == [p.answer for p in generate("train", 1, 2, 0)]
    True
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

NAMES = ["Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wen", "Yara", "Zoe"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "cards", "coins",
         "balloons", "crayons", "eggs", "flowers", "toy cars", "beads"]
CONTAINERS = ["boxes", "bags", "baskets", "jars", "packs", "crates"]
TEST_SHARE = 5  # one key in five belongs to the test split


@dataclass(frozen=True)
class ArithProblem:
    id: str
    question: str
    answer: int
    level: int
    key: str  # template + numbers: decides the split


def _split_of(key: str) -> str:
    return "test" if int(hashlib.sha256(key.encode()).hexdigest(), 16) % TEST_SHARE == 0 else "train"


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


def _level1(rng: random.Random) -> tuple[str, str, int]:
    # Small numbers: SmolLM2-135M solves these about one time in eight at T=0.8, so many questions are "mixed".
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(3, 40), rng.randint(2, 25)
        q = f"{name} has {a} {item}. {name} buys {b} more {item}. How many {item} does {name} have now?"
        return q, f"1+{a},{b}", a + b
    if op == "-":
        a = rng.randint(8, 50)
        b = rng.randint(2, a - 3)
        q = f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?"
        return q, f"1-{a},{b}", a - b
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        box = rng.choice(CONTAINERS)
        q = f"{name} buys {a} {box} of {item}. Each of the {box} holds {b} {item}. How many {item} does {name} buy?"
        return q, f"1*{a},{b}", a * b
    b, ans = rng.randint(2, 6), rng.randint(2, 12)
    q = (f"{name} has {ans * b} {item} and shares them equally among {b} friends. "
         f"How many {item} does each friend get?")
    return q, f"1/{ans * b},{b}", ans


def _chain(rng: random.Random, steps: int) -> tuple[str, str, int] | None:
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
    ask = f"How many {item} does each friend get?" if keys[-1].startswith("div") else \
        f"How many {item} does {name} have now?"
    return " ".join(parts + [ask]), f"{steps}:" + ",".join(keys), v


def generate(split: str, level: int = 1, n: int = 100, seed: int = 0, offset: int = 0) -> list[ArithProblem]:
    """The first `offset + n` distinct problems of `split` for this seed and level, minus the first `offset`."""
    if split not in ("train", "test"):
        raise ValueError(f"arith split must be 'train' or 'test', got {split!r}")
    if level not in (1, 2, 3):
        raise ValueError(f"arith level must be 1, 2 or 3, got {level!r}")
    rng = random.Random(f"ssb-arith-{seed}-{split}-{level}")
    seen: set[str] = set()
    out: list[ArithProblem] = []
    tries = 0
    while len(out) < offset + n:
        tries += 1
        if tries > 200 * (offset + n) + 10_000:
            raise ValueError(f"arith level {level} cannot supply {offset + n} distinct {split} problems")
        made = _level1(rng) if level == 1 else _chain(rng, level)
        if made is None:
            continue
        question, key, answer = made
        if key in seen or _split_of(key) != split:
            continue
        seen.add(key)
        pid = f"arith-l{level}-" + hashlib.sha256(key.encode()).hexdigest()[:10]
        out.append(ArithProblem(pid, question, answer, level, key))
    return out[offset:]
