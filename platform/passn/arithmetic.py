"""Multi-step arithmetic word problems with integer answers and worked solutions, in the MATH
format (`problem`, `solution` ending in ``\\boxed{}``, `answer`, `level`, `subject`, `unique_id`):
a reasoning task a 135M-parameter model can learn in minutes on a GPU and partly in a few CPU steps.

    train, test = arithmetic_splits(num_train=2000, num_test=200, seed=0, max_steps=3)
    # or: passn data arithmetic --out data/arith  (train.jsonl, test.jsonl; task.kind: math reads them)

A problem starts with a count of items and applies 1..max_steps operations (buy more, buy bags of
several, give away, double); its solution writes one equation per step and ends "The final answer
is $\\boxed{N}$." The same seed gives the same problems; no test problem's text is a train
problem's (the held-out split).
"""

from __future__ import annotations

import random
from typing import Any

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Ema", "Farid", "Grace", "Hugo", "Iris", "Jon", "Kira", "Leo", "Mia",
         "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sam", "Tara")
ITEMS = ("apples", "books", "marbles", "pencils", "stickers", "coins", "cards", "shells", "stamps", "cookies")


def _problem(rng: random.Random, max_steps: int) -> tuple[str, str, int, int]:
    """(problem, solution, answer, steps)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(2, 20)
    sentences = [f"{name} has {total} {item}."]
    lines = [f"{name} starts with {total} {item}."]
    steps = rng.randint(1, max_steps)
    for _ in range(steps):
        kind = rng.choice(("buy", "bags", "give", "double") if total > 1 else ("buy", "bags", "double"))
        if kind == "buy":
            k = rng.randint(1, 15)
            sentences.append(f"Then {name} buys {k} more.")
            lines.append(f"After buying {k} more: {total} + {k} = {total + k}.")
            total += k
        elif kind == "bags":
            bags, each = rng.randint(2, 5), rng.randint(2, 6)
            sentences.append(f"Then {name} buys {bags} bags with {each} {item} in each bag.")
            lines.append(f"The bags hold {bags} \\times {each} = {bags * each} {item}, so {total} + {bags * each} = "
                         f"{total + bags * each}.")
            total += bags * each
        elif kind == "give":
            k = rng.randint(1, total - 1)
            sentences.append(f"Then {name} gives {k} to a friend.")
            lines.append(f"After giving {k} away: {total} - {k} = {total - k}.")
            total -= k
        else:
            sentences.append(f"Then the number of {item} {name} has doubles.")
            lines.append(f"Doubling: 2 \\times {total} = {2 * total}.")
            total *= 2
    sentences.append(f"How many {item} does {name} have now?")
    lines.append(f"The final answer is $\\boxed{{{total}}}$.")
    return " ".join(sentences), " ".join(lines), total, steps


def arithmetic_splits(num_train: int, num_test: int, seed: int = 0, max_steps: int = 3
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, test rows), MATH-format, distinct problem texts across and within the splits."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    rng = random.Random(f"passn-arithmetic:{seed}:{max_steps}")
    seen: set[str] = set()
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    attempts = 0
    for split, count in (("train", num_train), ("test", num_test)):
        while len(splits[split]) < count:
            attempts += 1
            if attempts > 50 * (num_train + num_test) + 1000:
                raise ValueError(f"cannot draw {num_train} + {num_test} distinct problems with max_steps = "
                                 f"{max_steps}: ask for fewer")
            problem, solution, answer, steps = _problem(rng, max_steps)
            if problem in seen:
                continue
            seen.add(problem)
            rows = splits[split]
            rows.append({"problem": problem, "solution": solution, "answer": str(answer), "level": f"Level {steps}",
                         "subject": "Arithmetic", "unique_id": f"arithmetic/{split}/{len(rows)}"})
    return splits["train"], splits["test"]
