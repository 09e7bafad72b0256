"""passn.tasks: the synthetic task and MATH-format loading (JSONL, Parquet, save_to_disk)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from passn.coverage import exact_coverage
from passn.tasks import SYNTHETIC_ALPHABET, DataError, MathTask, SyntheticTask, load_math_problems

# ----------------------------------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------------------------------


def test_synthetic_task_is_reproducible_and_seeded():
    a, b, c = SyntheticTask(seed=0), SyntheticTask(seed=0), SyntheticTask(seed=1)
    assert a.problems("train") == b.problems("train")
    assert a.problems("test")[5] == b.problems("test")[5]
    assert [p.question for p in a.problems("train")[:20]] != [p.question for p in c.problems("train")[:20]]
    assert len(a.problems("train")) == 1000 and len(a.problems("test")) == 2000


def test_synthetic_task_follows_the_toy_recipe():
    task = SyntheticTask(seed=0)
    # Recompute the generator of docs/TOY.md by hand: q, then W, then Gumbel noise, one rng.
    rng = np.random.default_rng(1000)
    q = rng.integers(0, 10, size=(3000, 6))
    W = rng.standard_normal((2, 10, 10))
    S = np.zeros((3000, 2, 10))
    for n in range(3000):
        for k in range(2):
            S[n, k] = 3.0 / np.sqrt(6) * sum(W[k, q[n, i]] for i in range(6))
    G = rng.gumbel(size=(3000, 2, 10))
    ans = np.argmax(S + G, axis=-1)
    first = task.problems("train")[0]
    assert first.question == "".join("abcdefghij"[i] for i in q[0])
    assert first.answer == f"{ans[0, 0]}{ans[0, 1]}"
    assert [p.answer for p in task.problems("test")] == [f"{a}{b}" for a, b in ans[1000:]]


def test_synthetic_bayes_model_matches_toy_numbers():
    # docs/TOY.md: the Bayes-optimal model softmax(S) has test pass@1 ~0.38, pass@256 ~0.98.
    for seed in range(3):
        conf = SyntheticTask(seed=seed).bayes_confidence("test")
        pass1, pass256 = exact_coverage(conf, [1, 256]).mean(0)
        assert 0.33 < pass1 < 0.42 and pass256 > 0.97, (seed, pass1, pass256)


def test_synthetic_text_fits_the_40_token_vocabulary():
    assert len(SYNTHETIC_ALPHABET) + 3 == 40  # <pad> <bos> <eos> + 37 characters
    task = SyntheticTask(seed=0, variant="cot")
    problem = task.problems("train")[0]
    text = task.render_prompt(problem) + task.reference_completion(problem)
    assert set(text) <= set(SYNTHETIC_ALPHABET)


def test_synthetic_prompts_completions_and_checks():
    direct = SyntheticTask(seed=0)
    p = direct.problems("train")[0]
    assert direct.render_prompt(p) == p.question + "="
    assert direct.reference_completion(p) == p.answer
    assert direct.check(p, p.answer).correct
    assert not direct.check(p, "xx").correct
    assert direct.check(p, "").reason == "empty"
    cot = SyntheticTask(seed=0, variant="cot")
    completion = cot.reference_completion(p)
    assert completion == "".join(sorted(p.question)) + "=" + p.answer
    assert cot.check(p, completion).correct
    wrong = "00" if p.answer != "00" else "11"
    assert not cot.check(p, "".join(sorted(p.question)) + "=" + wrong).correct


# ----------------------------------------------------------------------------------------------
# MATH-format data
# ----------------------------------------------------------------------------------------------

ROWS = [
    {"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$.", "answer": "2", "level": "Level 1",
     "subject": "Algebra", "unique_id": "test/algebra/1.json"},
    {"problem": "Half of one?", "solution": "$\\boxed{\\frac{1}{2}}$", "level": "Level 2",
     "subject": "Prealgebra", "unique_id": "test/prealgebra/2.json"},  # answer from the solution
]


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def test_jsonl_parquet_and_save_to_disk_give_the_same_problems(tmp_path):
    jsonl = write_jsonl(tmp_path / "math.jsonl", ROWS)
    table = pa.Table.from_pylist([dict(r, answer=r.get("answer")) for r in ROWS])
    pq.write_table(table, tmp_path / "math.parquet")
    folder = tmp_path / "saved"
    folder.mkdir()
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "state.json").write_text("{}")
    loaded = [load_math_problems(s) for s in (jsonl, str(tmp_path / "math.parquet"), str(folder))]
    for problems in loaded:
        assert [p.answer for p in problems] == ["2", "\\frac{1}{2}"]
        assert [p.uid for p in problems] == ["test/algebra/1.json", "test/prealgebra/2.json"]
        assert problems[0].meta == {"level": "Level 1", "subject": "Algebra"}


def test_malformed_rows_are_named_and_written_to_rejects(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ROWS, ['{"problem": ""}', "not json", '{"problem": "no answer"}'])
    rejects = tmp_path / "rejects.jsonl"
    with pytest.raises(DataError) as err:
        load_math_problems(path, max_bad_fraction=0.2, rejects_path=str(rejects))
    message = str(err.value)
    assert f"{path}:3: field \"problem\" is missing or empty" in message
    assert f"{path}:4: invalid JSON" in message
    assert f"{path}:5: field \"answer\" is missing" in message
    assert "3 of 5 rows are malformed" in message
    written = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [r["where"] for r in written] == [f"{path}:3", f"{path}:4", f"{path}:5"]
    # a looser threshold keeps the good rows, and still writes the rejects
    assert len(load_math_problems(path, max_bad_fraction=0.6, rejects_path=str(rejects))) == 2


def test_a_line_that_is_not_utf8_is_a_reject_of_its_own(tmp_path):
    path = write_jsonl(tmp_path / "bytes.jsonl", ROWS)
    with open(path, "ab") as f:  # line 3: one Latin-1 byte (after the 16 of `{"problem": "caf`); line 4 good
        f.write(b'{"problem": "caf\xe9?", "answer": "1"}\n{"problem": "3+3?", "answer": "6"}\n')
    rejects = tmp_path / "rejects.jsonl"
    with pytest.raises(DataError) as err:
        load_math_problems(path, rejects_path=str(rejects))
    assert f"{path}:3: not UTF-8 (byte 0xe9 at column 17)" in str(err.value) and "1 of 4 rows" in str(err.value)
    [written] = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert written["where"] == f"{path}:3" and written["row"] == '{"problem": "caf\ufffd?", "answer": "1"}'
    assert [p.answer for p in load_math_problems(path, max_bad_fraction=0.25)] == ["2", "\\frac{1}{2}", "6"]


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_math_problems(str(tmp_path / "absent.jsonl"))
    (tmp_path / "data.csv").write_text("problem,answer\n")
    with pytest.raises(DataError, match="unknown format"):
        load_math_problems(str(tmp_path / "data.csv"))


def test_math_task_templates_and_checks(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", ROWS)
    direct = MathTask(path, path, template="direct")
    p = direct.problems("test")[1]
    assert direct.render_prompt(p).endswith("Final Answer: The final answer is ")
    assert direct.reference_completion(p) == "\\frac{1}{2}. I hope it is correct."
    assert direct.check(p, "0.5. I hope it is correct.").correct  # symbolic equivalence
    assert not direct.check(p, "0.6. I hope it is correct.").correct
    cot = MathTask(path, path, template="cot")
    assert cot.reference_completion(p) == p.solution
    assert cot.check(p, "so the answer is $\\boxed{1/2}$").correct
    r1 = MathTask(path, path, template="r1")
    assert r1.check(p, "think </think> <answer> \\frac12 </answer>").correct
    assert not r1.check(p, "think </think> \\boxed{1/2}").correct  # r1's format is strict
    with pytest.raises(DataError, match="task.train_path"):
        MathTask(None, path).problems("train")
