"""Training data: tokenised examples, padded batches, and the candidate stream with batch refill.

Shape legend: B = sequences, T = tokens.

The candidate stream walks a fixed, seeded permutation of the training set per epoch; its position
(epoch, cursor) is all the data state a checkpoint needs. Batch refill (MATH.md section 2) takes
candidates in stream order, keeps those whose coverage weight reaches the threshold, and stops at
exactly the number of sequences a step trains; candidates looked at but not reached stay in the
stream, and a step that runs past the end of an epoch continues into the next one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from passn.tasks import Problem, Task


@dataclasses.dataclass(frozen=True)
class Example:
    """One training sequence: prompt then completion; loss on the completion tokens only."""

    uid: str
    input_ids: tuple[int, ...]
    completion_start: int  # index in input_ids of the first completion token


def encode_examples(tokenizer, task: Task, problems: Sequence[Problem], max_length: int) -> list[Example]:
    """Tokenise prompt + reference completion + <eos> for each problem.

    Raises ValueError naming the problem when a character is outside the vocabulary or the
    sequence is longer than ``max_length`` (the model's position limit).
    """
    examples = []
    eos = tokenizer.eos_token_id
    for problem in problems:
        prompt, completion = task.prompt(problem), task.reference_completion(problem)
        try:
            prompt_ids = tokenizer(prompt).input_ids
            completion_ids = tokenizer(completion, add_special_tokens=False).input_ids + [eos]
        except Exception as exc:  # noqa: BLE001  (tokenizers raise a bare Exception for unknown symbols)
            raise ValueError(f"problem {problem.uid}: cannot tokenise its text ({exc}); "
                             "use a model whose vocabulary covers it (model.tiny.alphabet = 'ascii')") from exc
        ids = tuple(prompt_ids + completion_ids)
        if len(ids) > max_length:
            raise ValueError(f"problem {problem.uid}: {len(ids)} tokens exceed the model's limit of {max_length} "
                             "(raise model.tiny.max_position_embeddings or filter the data)")
        examples.append(Example(problem.uid, ids, len(prompt_ids)))
    return examples


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``inputs_BT``, ``targets_BT`` (inputs shifted by one) and ``mask_BT`` (1 where
    the target is a completion token)."""
    length = max(len(e.input_ids) for e in examples) - 1
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.float32)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.input_ids, dtype=torch.long)
        n = len(ids) - 1
        inputs[row, :n] = ids[:-1]
        targets[row, :n] = ids[1:]
        attention[row, :n] = 1
        mask[row, e.completion_start - 1 : n] = 1.0  # target t+1 is a completion token
    return {"inputs_BT": inputs, "targets_BT": targets, "mask_BT": mask, "attention_BT": attention}


@dataclasses.dataclass
class CandidateStream:
    """Seeded per-epoch permutations of ``size`` examples; ``(epoch, cursor)`` is the position."""

    size: int
    epochs: int
    seed: int
    epoch: int = 0
    cursor: int = 0

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs

    @property
    def progress(self) -> float:
        """Epochs done, fractional: 1.5 is half-way through the second epoch."""
        return self.epoch + self.cursor / self.size

    def peek(self, count: int) -> list[int]:
        """The next ``count`` example indices (fewer at the end of the last epoch), not consumed."""
        out: list[int] = []
        epoch, cursor = self.epoch, self.cursor
        while len(out) < count and epoch < self.epochs:
            order = self.order(epoch)
            take = order[cursor : cursor + count - len(out)]
            out.extend(int(i) for i in take)
            cursor += len(take)
            if cursor >= self.size:
                epoch, cursor = epoch + 1, 0
        return out

    def advance(self, count: int) -> None:
        cursor = self.cursor + count
        self.epoch += cursor // self.size
        self.cursor = cursor % self.size

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}


@dataclasses.dataclass(frozen=True)
class Refill:
    """The outcome of one refill round: chosen positions (into the candidates looked at), how many
    candidates were consumed from the stream, and how many of those were dropped."""

    chosen: list[int]
    consumed: int
    dropped: int


def refill(weights: Sequence[float], threshold: float, need: int) -> Refill:
    """Keep candidates in order while ``weight >= threshold`` until ``need`` are kept.

    Candidates after the last one kept are not consumed: the next round looks at them again
    (with the updated model), so none is skipped without being weighed for the step it joins.
    """
    chosen: list[int] = []
    for position, weight in enumerate(weights):
        if len(chosen) == need:
            break
        if weight >= threshold:
            chosen.append(position)
    consumed = (chosen[-1] + 1) if len(chosen) == need else len(weights)
    return Refill(chosen, consumed, consumed - len(chosen))
