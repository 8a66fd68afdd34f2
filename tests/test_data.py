import json

import pytest

from ssb.config import DatasetSpec
from ssb.data import DataError, arith, load_examples


def test_arith_is_seeded_and_splits_are_disjoint():
    a = arith.generate("train", level=1, n=300, seed=0)
    b = arith.generate("train", level=1, n=300, seed=0)
    assert [p.question for p in a] == [p.question for p in b]
    test = arith.generate("test", level=1, n=300, seed=3)
    assert not {p.key for p in a} & {p.key for p in test}
    assert len({p.id for p in a}) == 300


@pytest.mark.parametrize("level", [1, 2, 3])
def test_arith_answers_are_right(level):
    for p in arith.generate("train", level=level, n=50):
        assert isinstance(p.answer, int) and p.answer >= 0
        if level == 1:
            nums = [int(x) for x in p.key.split(",")[0][2:].split(",")] + [int(p.key.split(",")[1])]
            op = p.key[1]
            expect = {"+": nums[0] + nums[1], "-": nums[0] - nums[1], "*": nums[0] * nums[1], "/": nums[0] // nums[1]}[
                op
            ]
            assert p.answer == expect, p


def test_arith_level1_repeats_a_calculation_within_its_split_only():
    train, test = arith.generate("train", 1, 400), arith.generate("test", 1, 400)
    assert not {p.key for p in train} & {p.key for p in test}
    assert len({p.id for p in train}) == 400 and len({p.key for p in train}) < 400  # new wording or item
    nameless = {" ".join(w for w in p.question.split() if w.strip(".,?") not in arith.NAMES) for p in train}
    assert len(nameless) == 400  # a new name alone never makes a new problem
    # + and x count one key for both operand orders: 3 + 5 and 5 + 3 never land in different splits.
    assert all(p.key[1] not in "+*" or int(p.key[2:].split(",")[0]) <= int(p.key.split(",")[1]) for p in train)


def test_arith_level1_pool_sizes_stated_in_the_docs():
    """src/ssb/arith.py and the README: 118 training and 97 test calculations, 3,376 and 2,784 problems (two
    wordings x 16 items for +, - and x, one wording for /), and the presets' 300 held-out problems cover 81."""
    sizes = {}
    for split in ("train", "test"):
        keys = {p.key for p in arith.generate(split, 1, 1500)}
        sizes[split] = (len(keys), sum(len(arith.ITEMS) * (1 if k[1] == "/" else 2) for k in keys))
    assert sizes == {"train": (118, 3376), "test": (97, 2784)}
    assert len({p.key for p in arith.generate("test", 1, 300)}) == 81


def test_arith_asking_for_more_problems_than_a_split_holds_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(arith, "_level1", lambda rng: ("Q", "1+2,2", 4, ""))  # a pool of one problem
    split = arith._split_of("1+2,2")
    assert len(arith.generate(split, 1, 1)) == 1
    with pytest.raises(ValueError, match=f"holds only 1 distinct {split} problems, 2 were asked"):
        arith.generate(split, 1, 1, offset=1)


def test_arith_offset_gives_fresh_questions():
    first = arith.generate("train", 1, 20)
    later = arith.generate("train", 1, 20, offset=20)
    assert not {p.id for p in first} & {p.id for p in later}
    assert [p.id for p in arith.generate("train", 1, 40)] == [p.id for p in first + later]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_gsm8k_style_file(tmp_path):
    f = tmp_path / "gsm.jsonl"
    write_jsonl(f, [{"question": "q1", "answer": "work\n#### 2,125"}, {"question": "q2", "answer": "#### 7"}])
    ex = load_examples(DatasetSpec(source="gsm8k", split="test"), data_file=f)
    assert [e.answer for e in ex] == ["2125", "7"]
    assert ex[0].id == "gsm8k-000001"


def test_math_aime_amc_files(tmp_path):
    f = tmp_path / "m.jsonl"
    write_jsonl(f, [{"problem": "p", "answer": "\\frac{1}{2}", "unique_id": "test/a/1.json"}])
    (e,) = load_examples(DatasetSpec(source=str(f)))
    assert e.id == "test/a/1.json" and e.question == "p"
    f = tmp_path / "aime.jsonl"
    write_jsonl(f, [{"id": 1, "problem": "p", "answer": "025"}])
    assert load_examples(DatasetSpec(source="aime24"), data_file=f)[0].answer == "25"
    f = tmp_path / "amc.jsonl"
    write_jsonl(f, [{"id": 1, "question": "p", "answer": 27.0}])
    assert load_examples(DatasetSpec(source="amc23"), data_file=f)[0].answer == "27"


def test_field_mapping_limit_offset(tmp_path):
    f = tmp_path / "custom.jsonl"
    write_jsonl(f, [{"q": f"question {i}", "a": str(i), "key": f"k{i}"} for i in range(10)])
    spec = DatasetSpec(source=str(f), question_field="q", answer_field="a", id_field="key", offset=2, limit=3)
    assert [e.id for e in load_examples(spec)] == ["k2", "k3", "k4"]


@pytest.mark.parametrize(
    "row, match",
    [
        ("{bad json", r"bad\.jsonl:2: not valid JSON"),
        ({"question": "q"}, r"bad\.jsonl:2: missing field 'answer'"),
        ({"question": "q", "answer": ""}, r"bad\.jsonl:2: field 'answer' is empty"),
        ({"question": "", "answer": "3"}, r"bad\.jsonl:2: field 'question' is empty"),
    ],
)
def test_malformed_records_name_file_line_and_field(tmp_path, row, match, capsys):
    f = tmp_path / "bad.jsonl"
    write_jsonl(f, [{"question": "ok", "answer": "1"}, row, {"question": "ok2", "answer": "2"}])
    with pytest.raises(DataError, match=match):
        load_examples(DatasetSpec(source=str(f)))
    ex = load_examples(DatasetSpec(source=str(f), skip_bad_records=True))
    assert [e.answer for e in ex] == ["1", "2"]
    assert "skipped 1 malformed record" in capsys.readouterr().out


def test_missing_file_and_duplicate_ids(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_examples(DatasetSpec(source=str(tmp_path / "nope.jsonl")))
    f = tmp_path / "dup.jsonl"
    write_jsonl(f, [{"id": 1, "question": "a", "answer": "1"}, {"id": 1, "question": "b", "answer": "2"}])
    with pytest.raises(DataError, match="duplicate id"):
        load_examples(DatasetSpec(source=str(f)))


def test_arith_validation_slice_comes_from_training_calculations_only():
    """split val: one training calculation in four (31 of 118 at level 1, 912 problems); fit: the other 87
    (2,464 problems; pool sizes measured by asking for more). Neither shares a calculation with test; together
    they are train's calculations."""
    keys = {
        split: {p.key for p in arith.generate(split, 1, n)}
        for split, n in (("train", 1500), ("test", 1500), ("val", 400), ("fit", 1100))
    }
    assert {s: len(k) for s, k in keys.items()} == {"train": 118, "test": 97, "val": 31, "fit": 87}
    assert keys["val"] | keys["fit"] == keys["train"] and not keys["val"] & keys["fit"]
    assert not (keys["val"] | keys["fit"]) & keys["test"]
    for level in (2, 3):
        val, test = arith.generate("val", level, 50), arith.generate("test", level, 200)
        assert not {p.key for p in val} & {p.key for p in test}
    examples = load_examples(DatasetSpec(source="arith", split="val", limit=5))
    assert len(examples) == 5 and {e.answer for e in examples} and all(e.source == "arith-l1" for e in examples)
    with pytest.raises(ValueError, match="one of train, test, val, fit"):
        arith.generate("dev", 1, 5)
