"""VerifierPool: answer checks (``passn.verify``) spread over Ray actors, with one shared cache.

Each actor holds an :class:`passn.verify.AnswerChecker` (math-verify in killable, memory-capped
worker processes with a per-check time bound). The pool removes duplicate (prediction, reference)
pairs and answers repeats from its cache before anything is sent, so an answer sampled 4096 times
is checked once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from passn.deadlines import DeadlinePassed
from passn.verify import AnswerChecker, Mode, Verdict, normalise_unicode


@ray.remote(max_restarts=-1, max_task_retries=3)
class VerifierActor:
    def __init__(self, mode: Mode, timeout_s: float, memory_mb: int) -> None:
        self.checker = AnswerChecker(mode=mode, timeout_s=timeout_s, memory_mb=memory_mb)

    def check_many(self, pairs: Sequence[tuple[str | None, str]]) -> list[Verdict]:
        return self.checker.check_many(pairs)


class VerifierPool:
    def __init__(self, num_actors: int = 1, mode: Mode = "symbolic", timeout_s: float = 2.0,
                 memory_mb: int = 2048, cpus_per_actor: float = 0.25, call_timeout_s: float | None = None,
                 scheduling_strategy: Any = None) -> None:
        """``timeout_s`` bounds one check; ``call_timeout_s`` one ``check_many`` (past it: DeadlinePassed).
        ``scheduling_strategy``: where the actors go, e.g. pinned to the node of the training worker that
        owns them (which also keeps them out of a placement group that captures the caller's children)."""
        options: dict[str, Any] = {"num_cpus": cpus_per_actor}
        if scheduling_strategy is not None:
            options["scheduling_strategy"] = scheduling_strategy
        self.actors = [VerifierActor.options(**options).remote(mode, timeout_s, memory_mb) for _ in range(num_actors)]
        self.cache: dict[tuple[str, str], Verdict] = {}
        self.call_timeout_s = call_timeout_s

    def check_many(self, pairs: Sequence[tuple[str | None, str]]) -> list[Verdict]:
        keys = [(normalise_unicode(p) if p else "", normalise_unicode(r)) for p, r in pairs]
        todo = sorted({k for k in keys if k not in self.cache})
        if todo:
            shards = [todo[i :: len(self.actors)] for i in range(len(self.actors))]
            refs = [a.check_many.remote(s) for a, s in zip(self.actors, shards) if s]
            try:
                answered = ray.get(refs, timeout=self.call_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise DeadlinePassed(f"the verifier pool ({len(todo)} answer checks)", self.call_timeout_s or 0.0) from None
            for shard, verdicts in zip([s for s in shards if s], answered):
                self.cache.update(zip(shard, verdicts))
        return [self.cache[k] for k in keys]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
