import random

import pytest

from ssb.config import load_config
from ssb.files import read_jsonl, write_jsonl
from ssb.prompts import hinted_user_prompt, load_template, student_messages, teacher_messages
from ssb.rundir import RunDir
from ssb.stages.curate import choose_pair, classify, curate


def roll(verdict, extracted=None, text=None):
    return {
        "verdict": verdict,
        "extracted": extracted,
        "text": text or f"answer {extracted}",
        "correct": verdict == "correct",
    }


def test_classify():
    assert classify([roll("correct", "3"), roll("incorrect", "4")]) == "mixed"
    assert classify([roll("correct", "3"), roll("unparsed")]) == "all_correct"
    assert classify([roll("incorrect", "4"), roll("unparsed")]) == "all_wrong"
    assert classify([roll("unparsed"), roll("timeout")]) == "unparsed"


def test_most_common_wrong_answer_is_chosen():
    rolls = [roll("correct", "3"), roll("incorrect", "5"), roll("incorrect", "5.0"), roll("incorrect", "7")]
    for seed in range(20):
        good, bad, count = choose_pair(rolls, random.Random(seed))
        assert good["extracted"] == "3"
        assert bad["extracted"] in ("5", "5.0") and count == 2


def test_random_wrong_answer_without_majority_is_seeded():
    rolls = [roll("correct", "3"), roll("incorrect", "5"), roll("incorrect", "7"), roll("incorrect", "9")]
    picks = {choose_pair(rolls, random.Random(s))[1]["extracted"] for s in range(30)}
    assert picks == {"5", "7", "9"}
    assert choose_pair(rolls, random.Random(4))[1] == choose_pair(rolls, random.Random(4))[1]


def test_hinted_prompt_keeps_latex_and_never_resubstitutes():
    t = load_template(None)
    text = hinted_user_prompt(t, "Find {x}.", "so \\boxed{4} {wrong}", "\\frac{1}{2}")
    assert "Find {x}." in text and "so \\boxed{4} {wrong}" in text and "\\frac{1}{2}" in text
    assert "\\boxed{answer}" in text  # the template's own LaTeX survives
    msgs = teacher_messages(t, "Q", "C", "W", "SYS")
    assert msgs[0] == {"role": "system", "content": "SYS"} and "C" in msgs[1]["content"]
    assert student_messages("Q", "SYS") == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q"}]


def test_builtin_template_by_name():
    short = load_template("short")
    assert short != load_template(None) and all(f"{{{k}}}" in short for k in ("question", "correct", "wrong"))
    assert "{wrong}" not in load_template("short", negative=False)
    with pytest.raises(ValueError, match="not found: nonexistent .*built-in name: short"):
        load_template("nonexistent")


def test_template_errors_name_the_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("Problem {question} and {correct}")
    with pytest.raises(ValueError, match=r"t\.txt.*\{wrong\}"):
        load_template(f, negative=True)
    assert load_template(f, negative=False)
    f.write_text("{question} {correct} {wrong}")
    with pytest.raises(ValueError, match="no-negative"):
        load_template(f, negative=False)


def _rollouts(run):
    write_jsonl(
        run.rollouts,
        [
            {"id": "a", "question": "Qa", "gold": "3", "rollouts": [roll("correct", "3"), roll("incorrect", "4")]},
            {"id": "b", "question": "Qb", "gold": "3", "rollouts": [roll("correct", "3"), roll("correct", "3")]},
            {"id": "c", "question": "Qc", "gold": "3", "rollouts": [roll("incorrect", "1"), roll("unparsed")]},
            {"id": "d", "question": "Qd", "gold": "3", "rollouts": [roll("unparsed"), roll("unparsed")]},
        ],
    )


def test_curate_stage_funnel_and_records(tmp_path):
    run = RunDir(tmp_path).mkdir()
    _rollouts(run)
    counts = curate(load_config(), run)
    assert counts == {"questions": 4, "mixed": 1, "all_correct": 1, "all_wrong": 1, "unparsed": 1, "kept": 1}
    (rec,) = read_jsonl(run.curated)
    assert rec["id"] == "a" and rec["wrong_answer"] == "4"
    assert rec["student_messages"][1]["content"] == "Qa"
    assert "answer 4" in rec["teacher_messages"][1]["content"]
    nn = curate(load_config(None, ["curate.negative=false"]), run)
    assert nn["kept"] == 1
    (rec,) = read_jsonl(run.curated)
    assert rec["wrong"] is None and "answer 4" not in rec["teacher_messages"][1]["content"]


@pytest.mark.parametrize("template", [None, "short"])
def test_hint_order_wrong_first(template):
    """curate.order=wrong_first: the same hint with the wrong attempt shown before the correct one."""
    first = load_template(template, order="correct_first")
    wrong_first = load_template(template, order="wrong_first")
    text = hinted_user_prompt(wrong_first, "Q?", "CORRECT-ROLLOUT", "WRONG-ROLLOUT")
    assert text.index("WRONG-ROLLOUT") < text.index("CORRECT-ROLLOUT")
    text = hinted_user_prompt(first, "Q?", "CORRECT-ROLLOUT", "WRONG-ROLLOUT")
    assert text.index("CORRECT-ROLLOUT") < text.index("WRONG-ROLLOUT")
    assert load_template(template, negative=False, order="wrong_first") == load_template(template, negative=False)


def test_hint_order_of_a_template_file_must_match(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("{question} {correct} {wrong}")
    with pytest.raises(ValueError, match=r"t\.txt: curate.order is 'wrong_first' but the template shows the correct"):
        load_template(f, order="wrong_first")
    f.write_text("{question} {wrong} {correct}")
    assert load_template(f, order="wrong_first")


def test_curate_stage_with_wrong_first_order(tmp_path):
    run = RunDir(tmp_path).mkdir()
    _rollouts(run)
    counts = curate(load_config(None, ["curate.order=wrong_first"]), run)
    assert counts["kept"] == 1
    (rec,) = read_jsonl(run.curated)
    prompt = rec["teacher_messages"][1]["content"]
    assert prompt.index("Attempt A (wrong final answer)") < prompt.index("Attempt B (correct final answer)")
    assert prompt.index("answer 4") < prompt.index("answer 3")
