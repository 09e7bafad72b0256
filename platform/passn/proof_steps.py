"""The proof-step task: (proof state, tactic) pairs as `passn prover extract` writes them, for
DCOstep (each pair its own example with budget N_eff, paper Section 5.3) and CE.

A row is ``{"theorem", "file", "step", "state", "tactic"}``; the prompt is the state in
``passn.prover.PROMPT_TEMPLATE`` and the completion the tactic (then <eos>). The held-out check
is exact equality with the human tactic (per-step pass@k); proofs are searched by `passn prove`.
"""

from __future__ import annotations

import collections

from passn.config import RunConfig
from passn.prover import proof_prompt
from passn.tasks import DataError, Problem, Rejected, Split, Task, iter_rows

FIELDS = ("theorem", "step", "state", "tactic")


def _problem(row: object) -> Problem | str:
    """The row as a Problem, or why it is malformed."""
    if not isinstance(row, dict):
        return "expected an object"
    for field in FIELDS:
        if field not in row:
            return f'field "{field}" is missing'
    if not isinstance(row["state"], str) or not isinstance(row["tactic"], str) or not row["tactic"].strip():
        return 'fields "state" and "tactic" must be text (the tactic not empty)'
    return Problem(uid=f"{row['theorem']}#{row['step']}", question=row["state"], answer=row["tactic"].strip(),
                   meta={"theorem": row["theorem"], "file": row.get("file"), "step": row["step"]})


class ProofStepTask(Task):
    """(state, tactic) rows from JSONL files (local or s3://). Rows a model cannot read are left
    out and counted in ``dropped``: prompt plus tactic longer than ``max_chars``, or characters
    outside ``alphabet`` (a char-level model's)."""

    name = "coq-steps"

    def __init__(self, train_source: str | None, test_source: str | None, max_chars: int | None = None,
                 alphabet: str | None = None, max_bad_fraction: float = 0.0) -> None:
        self._sources = {"train": train_source, "test": test_source}
        self.max_chars, self.alphabet = max_chars, None if alphabet is None else frozenset(alphabet)
        self.max_bad_fraction = max_bad_fraction
        self.dropped: dict[str, collections.Counter] = {}
        self._cache: dict[str, list[Problem]] = {}

    def _readable(self, problem: Problem) -> str | None:
        text = self.render_prompt(problem) + problem.answer
        if self.max_chars is not None and len(text) > self.max_chars:
            return "longer than task.max_chars"
        if self.alphabet is not None and not set(text) <= self.alphabet:
            return "characters outside the model's alphabet"
        return None

    def problems(self, split: Split) -> list[Problem]:
        if split in self._cache:
            return self._cache[split]
        source = self._sources.get(split)
        if source is None:
            raise DataError(f"no {split} data configured (set task.{split}_path to `passn prover extract`'s {split}.jsonl)")
        good, bad, dropped = [], [], collections.Counter()
        try:
            for where, row in iter_rows(source):
                result = row.reason if isinstance(row, Rejected) else _problem(row)
                if isinstance(result, str):
                    bad.append(f"{where}: {result}")
                elif (why := self._readable(result)) is not None:
                    dropped[why] += 1
                else:
                    good.append(result)
        except FileNotFoundError as exc:
            raise DataError(f"{source}: no such file") from exc
        total = len(good) + len(bad) + sum(dropped.values())
        if bad and len(bad) / total > self.max_bad_fraction:
            shown = "\n".join(f"  {b}" for b in bad[:5])
            raise DataError(f"{source}: {len(bad)} of {total} rows are malformed, more than task.max_bad_fraction = "
                            f"{self.max_bad_fraction}:\n{shown}")
        if not good:
            raise DataError(f"{source}: no usable rows ({total} rows; left out: {dict(dropped) or 'none'})")
        self.dropped[split] = dropped
        self._cache[split] = good
        return good

    def render_prompt(self, problem: Problem) -> str:
        return proof_prompt(problem.question)

    def reference_completion(self, problem: Problem) -> str:
        return problem.answer

    def extract(self, completion: str) -> str | None:
        return completion.strip() or None


def proof_step_task(cfg: RunConfig) -> ProofStepTask:
    """The task of a ``task.kind = 'coq'`` run configuration (``passn.config.RunConfig``)."""
    from passn.models import ALPHABETS

    t = cfg.task
    alphabet = ALPHABETS[cfg.model.tiny.alphabet] if cfg.model.tiny is not None else None
    return ProofStepTask(t.train_path, t.test_path, t.max_chars, alphabet, t.max_bad_fraction)
