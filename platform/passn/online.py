"""Online sampling inside training (DCOa, Dr. GRPO): the bookkeeping, free of Ray and engines.

DCOa (paper Section 5.4, MATH.md section 4) weighs a reference chain of thought by F(N', p_MC),
p_MC = correct / k over k samples from the current policy. Samples are tagged with the policy
version that drew them; an estimate may be used while the trainer is at most ``staleness``
versions ahead of it. Dr. GRPO (Appendix B, MATH.md section 6) trains G rollouts per prompt with
advantages R - mean R, skipping groups whose rewards are all equal.

    cache = MonteCarloCache()
    cache.put(17, correct=5, samples=64, version=3)
    cache.usable([17, 18], trainer_version=4, staleness=1)   # {17}; 18 must be sampled
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Estimate:
    """k samples of one candidate's prompt from policy ``version``; ``correct`` of them verified."""

    correct: int
    samples: int
    version: int

    @property
    def p_mc(self) -> float:
        return self.correct / self.samples


class MonteCarloCache:
    """p_MC estimates by training-example index. Saved with checkpoints (``to_json``), so a resumed
    run reuses what it had sampled under the same staleness rule."""

    def __init__(self) -> None:
        self.entries: dict[int, Estimate] = {}

    def put(self, index: int, correct: int, samples: int, version: int) -> None:
        if not 0 <= correct <= samples or samples < 1:
            raise ValueError(f"example {index}: need 0 <= correct ({correct}) <= samples ({samples}), samples >= 1")
        self.entries[index] = Estimate(correct, samples, version)

    def usable(self, indices: Iterable[int], trainer_version: int, staleness: int) -> set[int]:
        """The indices whose estimate is at most ``staleness`` versions behind the trainer."""
        return {i for i in indices if i in self.entries and 0 <= trainer_version - self.entries[i].version <= staleness}

    def prune(self, trainer_version: int, staleness: int) -> None:
        """Drop estimates too old to be used again (the cache stays the size of a few windows)."""
        self.entries = {i: e for i, e in self.entries.items() if trainer_version - e.version <= staleness}

    def to_json(self) -> dict[str, Any]:
        return {str(i): [e.correct, e.samples, e.version] for i, e in self.entries.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MonteCarloCache:
        cache = cls()
        for index, (correct, samples, version) in data.items():
            cache.put(int(index), correct, samples, version)
        return cache


def p_mc_summary(estimates: Sequence[Estimate], trainer_version: int, name: str = "p_mc") -> dict[str, float]:
    """The p_MC distribution of a step's candidates (``name``: "reward" for Dr. GRPO's groups) and
    how stale their samples were, for the log."""
    if not estimates:
        return {}
    p = np.array([e.p_mc for e in estimates])
    lag = [trainer_version - e.version for e in estimates]
    return {f"{name}_mean": float(p.mean()), f"{name}_min": float(p.min()), f"{name}_max": float(p.max()),
            f"{name}_zero": float((p == 0).mean()), f"{name}_one": float((p == 1).mean()), "staleness": int(max(lag)),
            "policy_v": int(min(e.version for e in estimates))}


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One sampled completion of a prompt, its verifier reward and the policy version behind it."""

    token_ids: tuple[int, ...]
    reward: float
    version: int
