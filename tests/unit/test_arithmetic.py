"""The arithmetic word-problem generator: MATH-format rows whose worked solutions are right, the
same for the same seed, a held-out split that shares no problem with the train split."""

import json
import re

import pytest
from passn.arithmetic import arithmetic_splits
from passn.models import ALPHABETS, char_tokenizer
from passn.tasks import MathTask, chat_formatter

EQUATION = re.compile(r"(\d+) (\+|-|\\times) (\d+) = (\d+)")


def test_solutions_are_right_and_end_in_the_boxed_answer():
    train, test = arithmetic_splits(300, 50, seed=3, max_steps=3)
    assert len(train) == 300 and len(test) == 50
    for row in train + test:
        equations = EQUATION.findall(row["solution"])
        assert equations, row
        for a, op, b, c in equations:
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "\\times": int(a) * int(b)}[op] == int(c), row
        assert row["solution"].endswith(f"$\\boxed{{{row['answer']}}}$.") and int(row["answer"]) > 0
        assert row["subject"] == "Arithmetic" and row["level"] in ("Level 1", "Level 2", "Level 3")
    assert len({r["unique_id"] for r in train + test}) == 350
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}  # held out
    assert arithmetic_splits(300, 50, seed=3, max_steps=3) == (train, test)  # seeded
    assert arithmetic_splits(300, 50, seed=4, max_steps=3) != (train, test)
    with pytest.raises(ValueError, match="max_steps"):
        arithmetic_splits(1, 1, max_steps=0)


def test_the_math_loader_reads_them_and_checks_their_answers(tmp_path):
    train, test = arithmetic_splits(20, 5, seed=0)
    for split, rows in (("train", train), ("test", test)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = MathTask(str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl"), template="cot", mode="exact")
    problems = task.problems("test")
    assert [p.uid for p in problems] == [r["unique_id"] for r in test]
    for problem, row in zip(problems, test):
        assert problem.answer == row["answer"] and task.reference_completion(problem) == row["solution"]
        assert task.check(problem, row["solution"]).correct
        assert not task.check(problem, row["solution"].replace(f"{{{row['answer']}}}", "{0}")).correct


def test_a_tokenizer_without_a_chat_template_leaves_prompts_as_they_are():
    assert chat_formatter(char_tokenizer(ALPHABETS["synthetic"])) is None


def test_a_test_path_that_cannot_be_read_is_an_error_not_a_run_without_evaluation(tmp_path):
    from passn.config import load_config
    from passn.tasks import DataError, build_task, held_out_problems

    train, _ = arithmetic_splits(4, 0, seed=0)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    base = ["model.tiny=null", "model.path=unused", "task.kind=math", f"task.train_path={tmp_path / 'train.jsonl'}"]
    cfg = load_config(None, base)
    assert held_out_problems(build_task(cfg), cfg) == []  # no test split configured: no evaluation
    cfg = load_config(None, [*base, f"task.test_path={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        held_out_problems(build_task(cfg), cfg)
