"""Tasks: where problems come from, how prompts are rendered, and how answers are checked.

- :class:`MathTask`: MATH-format rows (problem, solution, answer, level, subject, unique_id) from
  JSONL, Parquet or Hugging Face ``save_to_disk`` folders, local or ``s3://``, with the paper's
  direct-answer, chain-of-thought and r1 prompt templates.
- :class:`SyntheticTask`: the built-in "bag of letters, noisy two-digit answer" task of
  docs/TOY.md, generated from a seed: the answer is partly predictable from the question and
  partly a frozen random draw, so CE fine-tuning memorises the draws and becomes confidently wrong
  on held-out problems, the paper's effect, on CPU in seconds.
"""

from __future__ import annotations

import abc
import dataclasses
import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import fsspec
import numpy as np

from passn import verify

if TYPE_CHECKING:
    from passn.config import RunConfig

Split = Literal["train", "test"]


class DataError(ValueError):
    """A data file is unreadable or has too many malformed rows (the message names them)."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One verifiable problem: the question, its reference answer, and a reference solution."""

    uid: str
    question: str
    answer: str
    solution: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


class Task(abc.ABC):
    """A source of problems with a prompt format and an answer check."""

    name: str
    # the model's chat template, when prompts go through it (build_task sets it from the tokenizer)
    chat: Callable[[str], str] | None = None

    def prompt(self, problem: Problem) -> str:
        """The text the model is given: ``render_prompt``, through the model's chat template when
        it has one (training, sampling, evaluation alike)."""
        text = self.render_prompt(problem)
        return self.chat(text) if self.chat is not None else text

    @abc.abstractmethod
    def problems(self, split: Split) -> list[Problem]:
        """The problems of ``split`` in a fixed order."""

    @abc.abstractmethod
    def render_prompt(self, problem: Problem) -> str:
        """The text the model is conditioned on."""

    @abc.abstractmethod
    def reference_completion(self, problem: Problem) -> str:
        """The text CE-style objectives train on (without an end-of-sequence token)."""

    @abc.abstractmethod
    def extract(self, completion: str) -> str | None:
        """The final answer inside a completion, or None."""

    def check(self, problem: Problem, completion: str) -> verify.Verdict:
        """Whether ``completion`` answers ``problem`` correctly, with the reason."""
        return self.check_many([problem], [completion])[0]

    def check_many(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[verify.Verdict]:
        """Exact string equality of the extracted answer (tasks with canonical answers)."""
        verdicts = []
        for problem, completion in zip(problems, completions, strict=True):
            answer = self.extract(completion)
            if answer is None:
                verdicts.append(verify.Verdict(False, "empty"))
            else:
                verdicts.append(verify.Verdict(answer == problem.answer, "exact" if answer == problem.answer else "not_equivalent"))
        return verdicts


# ---------------------------------------------------------------------------------------------
# The synthetic task (docs/TOY.md)
# ---------------------------------------------------------------------------------------------

# The characters of the synthetic task; a char-level tokenizer puts <pad> <bos> <eos> before them,
# giving TOY.md's 40 ids: '=' 3, digits 4-13, letters 14-39.
SYNTHETIC_ALPHABET = "=0123456789abcdefghijklmnopqrstuvwxyz"
SEPARATOR = "="


class SyntheticTask(Task):
    """Bag of letters, noisy two-digit answer (docs/TOY.md), generated from ``seed``.

    One ``numpy.random.default_rng(1000 + seed)`` draws, in order: questions
    ``q = integers(0, letters, (train + test, length))``; tables
    ``W = standard_normal((digits, letters, 10))``; Gumbel noise ``G`` of shape
    ``(train + test, digits, 10)``. Scores ``S[n, k, d] = beta / sqrt(length) * sum_i W[k, q[n, i], d]``;
    the reference digit is ``argmax_d S + G``: one draw from softmax(S), frozen as the only correct
    answer. Rows 0..train-1 are the train split, the rest the test split.

    ``variant="direct"``: prompt ``"abcdef="``, completion ``"37"``. ``variant="cot"``: the
    completion first writes the question's letters sorted (an order-free trace of the rule), then
    ``"="`` and the digits: ``"abcdef=abcdef=37"`` has prompt ``"abcdef="``; the answer is the text
    after the last ``"="``.
    """

    def __init__(self, seed: int = 0, variant: Literal["direct", "cot"] = "direct", num_train: int = 1000,
                 num_test: int = 2000, question_length: int = 6, num_letters: int = 10, num_digits: int = 2,
                 beta: float = 3.0) -> None:
        if variant not in ("direct", "cot"):
            raise ValueError(f"variant must be 'direct' or 'cot', got {variant!r}")
        if not 1 <= num_letters <= 26:
            raise ValueError(f"num_letters must be in [1, 26], got {num_letters}")
        self.name = f"synthetic-{variant}"
        self.seed, self.variant, self.beta = seed, variant, beta
        self.num_train, self.num_test = num_train, num_test
        rng = np.random.default_rng(1000 + seed)
        total = num_train + num_test
        self.questions = rng.integers(0, num_letters, size=(total, question_length))
        tables = rng.standard_normal((num_digits, num_letters, 10))
        # scores[n, k, d] = beta / sqrt(L) * sum_i tables[k, q[n, i], d]
        self.scores = (beta / math.sqrt(question_length)) * tables[:, self.questions, :].sum(axis=2).transpose(1, 0, 2)
        noise = rng.gumbel(size=(total, num_digits, 10))
        self.answer_digits = np.argmax(self.scores + noise, axis=-1)
        self._problems = [self._problem(n) for n in range(total)]

    def _problem(self, n: int) -> Problem:
        question = "".join(SYNTHETIC_ALPHABET[11 + c] for c in self.questions[n])
        answer = "".join(str(d) for d in self.answer_digits[n])
        split = "train" if n < self.num_train else "test"
        return Problem(uid=f"synthetic-{self.seed}-{n}", question=question, answer=answer, meta={"split": split, "row": n})

    def problems(self, split: Split) -> list[Problem]:
        if split == "train":
            return self._problems[: self.num_train]
        if split == "test":
            return self._problems[self.num_train :]
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    def render_prompt(self, problem: Problem) -> str:
        return problem.question + SEPARATOR

    def reference_completion(self, problem: Problem) -> str:
        if self.variant == "direct":
            return problem.answer
        return "".join(sorted(problem.question)) + SEPARATOR + problem.answer

    def extract(self, completion: str) -> str | None:
        answer = completion.rsplit(SEPARATOR, 1)[-1].strip()
        return answer or None

    def bayes_confidence(self, split: Split) -> np.ndarray:
        """p(reference answer) under the generating distribution softmax(S): the Bayes-optimal
        model's confidence, an upper reference for what training can reach."""
        rows = slice(0, self.num_train) if split == "train" else slice(self.num_train, None)
        scores = self.scores[rows]
        log_probs = scores - np.logaddexp.reduce(scores, axis=-1, keepdims=True)
        picked = np.take_along_axis(log_probs, self.answer_digits[rows][..., None], axis=-1)[..., 0]
        return np.exp(picked.sum(-1))


# ---------------------------------------------------------------------------------------------
# MATH-format data
# ---------------------------------------------------------------------------------------------

# Prompt templates. "direct" asks for the final answer only (paper Sections 4-5.2); "cot" for a
# worked solution ending in \boxed{} (Section 5.4); "r1" is DeepSeek-R1's template, used for the
# GRPO baseline (Appendix B).
TEMPLATES = {
    "direct": "Problem:\n{problem}\n\nFinal Answer: The final answer is ",
    "cot": "Problem:\n{problem}\n\nSolution:\n",
    "r1": (
        "A conversation between User and Assistant. The User asks a question, and the Assistant "
        "solves it. The Assistant first thinks about the reasoning process in the mind and then "
        "provides the User with the answer. The reasoning process and answer are enclosed within "
        "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
        "here </think> <answer> answer here </answer>. User: {problem} Assistant: <think>"
    ),
}
_OPTIONAL_TEXT_FIELDS = ("solution", "level", "subject", "unique_id")


@dataclasses.dataclass(frozen=True)
class Rejected:
    where: str
    reason: str
    row: Any


def _validate_math_row(row: Any, where: str) -> Problem | Rejected:
    if not isinstance(row, dict):
        return Rejected(where, f"expected an object with a 'problem' field, got {type(row).__name__}", row)
    problem = row.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        return Rejected(where, 'field "problem" is missing or empty', row)
    for field in _OPTIONAL_TEXT_FIELDS:
        if row.get(field) is not None and not isinstance(row[field], (str, int)):
            return Rejected(where, f'field "{field}" must be text, got {type(row[field]).__name__}', row)
    answer = row.get("answer")
    if answer is None and isinstance(row.get("solution"), str):
        answer = verify.extract_answer(row["solution"])
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        return Rejected(where, 'field "answer" is missing (and the solution has no \\boxed{} answer)', row)
    meta = {k: row[k] for k in ("level", "subject") if row.get(k) is not None}
    return Problem(uid=str(row.get("unique_id") or where), question=problem, answer=answer.strip(),
                   solution=row.get("solution") or "", meta=meta)


def iter_rows(source: str) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs from a JSONL file, a Parquet file or a save_to_disk folder."""
    fs, path = fsspec.core.url_to_fs(source)
    name = PurePosixPath(path).name
    if fs.isdir(path):
        arrow_files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".arrow"))
        if not arrow_files:
            raise DataError(f"{source}: a folder must be a Hugging Face save_to_disk folder (*.arrow files)")
        import pyarrow as pa

        offset = 0
        for arrow_path in arrow_files:
            with fs.open(arrow_path, "rb") as f:
                table = pa.ipc.open_stream(io.BytesIO(f.read())).read_all()
            for i, row in enumerate(table.to_pylist()):
                yield f"{source}:row {offset + i + 1}", row
            offset += table.num_rows
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        for i, row in enumerate(table.to_pylist()):
            yield f"{source}:row {i + 1}", row
    elif name.endswith((".jsonl", ".json")):
        with fs.open(path, "rb") as f:  # bytes, decoded line by line: a bad byte rejects its line alone
            for lineno, raw in enumerate(f, start=1):
                where = f"{source}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield where, Rejected(where, f"not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})",
                                          raw.decode("utf-8", "replace").rstrip("\r\n"))
                    continue
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield where, Rejected(where, f"invalid JSON: {exc.msg}", line.rstrip("\n"))
    else:
        raise DataError(f"{source}: unknown format; use .jsonl, .parquet or a save_to_disk folder")


def load_math_problems(source: str, max_bad_fraction: float = 0.0, rejects_path: str | None = None) -> list[Problem]:
    """Read MATH-format rows from ``source`` (local path or URL such as ``s3://bucket/train.jsonl``).

    Every malformed row is named (``file:line: reason``) and written to ``rejects_path`` (JSONL)
    when given; if more than ``max_bad_fraction`` of the rows are bad, :class:`DataError` is
    raised before anything trains.
    """
    try:
        pairs = list(iter_rows(source))
    except FileNotFoundError as exc:
        raise DataError(f"{source}: no such file") from exc
    except PermissionError as exc:
        raise DataError(f"{source}: access denied ({exc}); check the storage credentials") from exc
    good: list[Problem] = []
    bad: list[Rejected] = []
    for where, row in pairs:
        result = row if isinstance(row, Rejected) else _validate_math_row(row, where)
        (bad if isinstance(result, Rejected) else good).append(result)
    if rejects_path is not None and bad:
        with fsspec.open(rejects_path, "wt", encoding="utf-8") as f:
            for r in bad:
                f.write(json.dumps({"where": r.where, "reason": r.reason, "row": r.row}, default=str) + "\n")
    total = len(good) + len(bad)
    if total == 0:
        raise DataError(f"{source}: no rows")
    if bad and len(bad) / total > max_bad_fraction:
        shown = "\n".join(f"  {r.where}: {r.reason}" for r in bad[:5])
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        hint = f" (rejected rows written to {rejects_path})" if rejects_path else ""
        raise DataError(
            f"{source}: {len(bad)} of {total} rows are malformed, more than "
            f"task.max_bad_fraction = {max_bad_fraction}{hint}:\n{shown}{more}"
        )
    return good


class MathTask(Task):
    """MATH-format problems (e.g. Lightman et al.'s 12k/500 split as two files)."""

    def __init__(self, train_source: str | None, test_source: str | None, template: str = "direct",
                 max_bad_fraction: float = 0.0, rejects_dir: str | None = None,
                 mode: verify.Mode = "symbolic") -> None:
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
        self.name = f"math-{template}"
        self.template, self.mode = template, mode
        self._sources = {"train": train_source, "test": test_source}
        self._max_bad_fraction = max_bad_fraction
        self._rejects_dir = rejects_dir
        self._cache: dict[str, list[Problem]] = {}

    def problems(self, split: Split) -> list[Problem]:
        if split not in self._cache:
            source = self._sources.get(split)
            if source is None:
                raise DataError(f"no {split} data configured (set task.{split}_path)")
            rejects = f"{self._rejects_dir.rstrip('/')}/rejects-{split}.jsonl" if self._rejects_dir else None
            self._cache[split] = load_math_problems(source, self._max_bad_fraction, rejects)
        return self._cache[split]

    def render_prompt(self, problem: Problem) -> str:
        return TEMPLATES[self.template].format(problem=problem.question)

    def reference_completion(self, problem: Problem) -> str:
        if self.template == "direct":
            return f"{problem.answer}. I hope it is correct."
        if self.template == "r1":
            return f"{problem.solution} </think> <answer> {problem.answer} </answer>"
        return problem.solution

    def extract(self, completion: str) -> str | None:
        if self.template == "direct":
            return verify.extract_answer("The final answer is " + completion)
        if self.template == "r1":
            inside = completion.rsplit("<answer>", 1)
            if len(inside) < 2 or "</answer>" not in inside[1]:
                return None  # r1 requires the strict format
            return verify.extract_answer(inside[1].split("</answer>", 1)[0]) or None
        return verify.extract_answer(completion)

    def check_many(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[verify.Verdict]:
        predictions = [self.extract(c) for c in completions]
        checker = verify.default_checker(self.mode)
        return checker.check_many(list(zip(predictions, (p.answer for p in problems), strict=True)))


# ---------------------------------------------------------------------------------------------
# The task a run configures
# ---------------------------------------------------------------------------------------------


def chat_formatter(tokenizer: Any) -> Callable[[str], str] | None:
    """The tokenizer's chat template as a prompt formatter (the text as one user turn, the
    assistant's turn opened), or None where it has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def chat(text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)

    return chat


def build_task(cfg: RunConfig, run_dir: str | None = None, tokenizer: Any = None) -> Task:
    """The task of ``cfg.task`` (rejected rows go to ``run_dir`` when given); its prompts go
    through ``tokenizer``'s chat template when it has one (unless task.chat_template = 'never')."""
    t = cfg.task
    task: Task
    if t.kind == "synthetic":
        s = t.synthetic
        task = SyntheticTask(seed=t.seed, variant=t.variant, num_train=s.num_train, num_test=s.num_test,  # type: ignore[arg-type]
                             question_length=s.question_length, num_letters=s.num_letters, beta=s.beta)
    elif t.kind == "coq":
        from passn.proof_steps import proof_step_task

        task = proof_step_task(cfg)
    else:
        task = MathTask(t.train_path, t.test_path, template=t.variant, max_bad_fraction=t.max_bad_fraction,
                        rejects_dir=run_dir, mode=t.answer_check)
    if tokenizer is not None and t.chat_template == "auto":
        task.chat = chat_formatter(tokenizer)
    return task


def held_out_problems(task: Task, cfg: RunConfig) -> list:
    """The test split, or none for a MATH run configured without one (no epoch-end evaluation). A
    test_path that is set but cannot be read is an error, never a run without evaluation."""
    if cfg.task.kind == "math" and cfg.task.test_path is None:
        return []
    try:
        return task.problems("test")
    except DataError:
        if cfg.task.kind == "coq":
            return []
        raise
