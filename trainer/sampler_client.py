"""The policy's own samples during training (DCOa, Dr. GRPO).

Each training worker owns a :class:`trainer.policy_pool.PolicyPool`: a sampler pool on its own
node (and, on GPU clusters, a fraction of its own GPU) that holds the worker's current weights,
pushed in memory before it samples for trainer version v, and refuses work for a version it
missed.

The candidates of a step are split over the workers; each samples its share with its own pool,
and the results are all-gathered, so every worker holds the same Monte Carlo cache and takes the
same keep/drop decisions. With ``objective.staleness: 1`` a worker's pool samples the next
step's candidates in a background thread while the worker trains the current step.

It is the :class:`passn.batches.Sampler` that DCOa's and Dr. GRPO's batch sources read:

    online = OnlineSampler(cfg, task, problems, tokenizer, engine, limit, collective)
    estimates = online.estimates(window, trainer_version=step)   # DCOa: p_MC per candidate
    groups = online.groups(window, trainer_version=step)         # Dr. GRPO: G rollouts per prompt
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from passn.collective import Collective
from passn.config import RunConfig
from passn.online import Estimate, MonteCarloCache, Rollout
from passn.sampling import group_by_prompt
from trainer.policy_pool import PolicyPool, this_node

# one draw: example index -> [(completion token ids, verified correct)]
Draw = dict[int, list[tuple[tuple[int, ...], bool]]]


def answer_checker(cfg: RunConfig):
    """A training worker's answer checker for a MATH-format task: math-verify on a Ray actor on the
    worker's node, one cache, each batch of checks bounded by resources.sampler_unit_timeout_s."""
    from actors.verifier import VerifierPool

    return VerifierPool(mode=cfg.task.answer_check, scheduling_strategy=this_node(),
                        call_timeout_s=cfg.resources.sampler_unit_timeout_s)


class OnlineSampler:
    def __init__(self, cfg: RunConfig, task, problems: Sequence, tokenizer, engine, max_model_len: int,
                 collective: Collective) -> None:
        """``engine``: the training engine whose weights the pool samples (``trainer.policy_pool``)."""
        self.cfg, self.task, self.problems, self.tokenizer = cfg, task, problems, tokenizer
        self.collective, self.rank, self.world, self.gather = collective, collective.rank, collective.world, collective.gather
        self.kind = cfg.objective.kind
        self.samples = cfg.objective.mc_samples if self.kind == "dcoa" else cfg.objective.group_size
        self.staleness = cfg.objective.staleness
        self.cache = MonteCarloCache()  # dcoa
        self.rollouts: dict[int, list[Rollout]] = {}  # dr_grpo
        # at staleness 1 the trainer steps beside the draw: the engine may not sleep after it
        self.policy = PolicyPool(cfg, tokenizer, engine, max_model_len, self.rank, task.prompt(problems[0]),
                                 sleep_between_draws=self.staleness == 0)
        self.verifier = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="passn-prefetch")
        self.pending: tuple[Future, int] | None = None  # a background draw and its policy version
        self.metrics: dict[str, float] = {}

    def _ensure(self, trainer_version: int) -> None:
        """The pool holds the trainer's weights of ``trainer_version``, and (a MATH-format task) the
        answer checker is up."""
        from passn.tasks import MathTask

        self.policy.ensure(trainer_version)
        if self.verifier is None and isinstance(self.task, MathTask):  # math-verify on Ray actors, one cache per worker
            self.verifier = answer_checker(self.cfg)

    # -- drawing samples ---------------------------------------------------------------------------
    def _draw(self, indices: Sequence[int], version: int) -> tuple[Draw, float, int]:
        """``self.samples`` completions of each prompt, verified: (draw, seconds, tokens)."""
        started = time.perf_counter()
        if not indices:
            return {}, 0.0, 0
        problems = [self.problems[i] for i in indices]
        prompts = [self.task.prompt(p) for p in problems]
        # a function of what is drawn, not of how many draws came before: a resumed run draws the same
        seed = self.cfg.sampling.seed + 1_000_003 * version + 7919 * self.rank + indices[0]
        completions = self.policy.generate(prompts, self.samples, self.cfg.sampling.temperature,
                                           self.cfg.sampling.max_new_tokens, seed,
                                           [f"training example {p.uid}" for p in problems])
        groups = group_by_prompt(completions, len(prompts))
        texts = [c.text for g in groups for c in g]
        references = [p for p, g in zip(problems, groups) for _ in g]
        if self.verifier is not None:
            verdicts = self.verifier.check_many([(self.task.extract(t), p.answer) for p, t in zip(references, texts)])
        else:  # the synthetic task: an exact comparison in this process
            verdicts = self.task.check_many(references, texts)
        draw: Draw = {}
        position = 0
        for index, group in zip(indices, groups):
            draw[index] = [(c.token_ids, verdicts[position + j].correct) for j, c in enumerate(group)]
            position += len(group)
        return draw, time.perf_counter() - started, sum(c.num_tokens for c in completions)

    def _merge(self, local: tuple[Draw, float, int] | str, version: int, overlapped: bool) -> None:
        """All workers' shares of one draw into every worker's cache. ``local`` is this worker's
        share, or its error message: an error on one worker is raised on every worker, so none
        waits in a collective for one that has failed."""
        parts = self.gather(local)
        errors = [f"worker {rank}: {part}" for rank, part in enumerate(parts) if isinstance(part, str)]
        if errors:
            raise RuntimeError("online sampling failed on " + "; ".join(errors))
        for draw, _, _ in parts:
            for index, samples in draw.items():
                if self.kind == "dcoa":
                    self.cache.put(index, sum(ok for _, ok in samples), len(samples), version)
                else:
                    self.rollouts[index] = [Rollout(t, float(ok), version) for t, ok in samples]
        self._add("sample_overlapped_s" if overlapped else "sample_s", max(seconds for _, seconds, _ in parts))
        self._add("sampled_tokens", sum(tokens for _, _, tokens in parts))

    def _collect_prefetch(self) -> None:
        if self.pending is not None:
            future, version = self.pending
            self.pending = None
            self._merge(_outcome(future.result), version, overlapped=True)

    settle = _collect_prefetch  # before a checkpoint: the background draw joins the cache

    def _fresh(self, indices: Sequence[int], trainer_version: int) -> list[int]:
        if self.kind == "dcoa":
            ok = self.cache.usable(indices, trainer_version, self.staleness)
        else:
            ok = {i for i in indices if i in self.rollouts
                  and 0 <= trainer_version - self.rollouts[i][0].version <= self.staleness}
        return [i for i in dict.fromkeys(indices) if i not in ok]

    def _fill(self, indices: Sequence[int], trainer_version: int) -> None:
        self._collect_prefetch()
        need = self._fresh(indices, trainer_version)  # the same on every worker: the caches are equal
        if need:
            def draw():  # a draw the trainer waits for uses its current weights, whatever the staleness
                self._ensure(trainer_version)
                return self._draw(need[self.rank :: self.world], self.policy.version)

            local = _outcome(draw)
            self._merge(local, trainer_version if isinstance(local, str) else self.policy.version, overlapped=False)

    def estimates(self, indices: Sequence[int], trainer_version: int) -> list[Estimate]:
        """DCOa: p_MC of each candidate from samples at most ``staleness`` versions old."""
        self._fill(indices, trainer_version)
        return [self.cache.entries[i] for i in indices]

    def groups(self, indices: Sequence[int], trainer_version: int) -> list[list[Rollout]]:
        """Dr. GRPO: G verified rollouts per prompt."""
        self._fill(indices, trainer_version)
        return [self.rollouts[i] for i in indices]

    def prefetch(self, indices: Sequence[int], trainer_version: int) -> None:
        """With staleness 1: sample the next step's candidates in the background, with the weights
        of version ``trainer_version`` (used at ``trainer_version + 1``, one version behind)."""
        if self.staleness == 0:
            return
        need = self._fresh(indices, trainer_version + 1)
        if not need:
            return
        assert self.pending is None, "a prefetch is already running"
        error = _outcome(lambda: self._ensure(trainer_version))
        if isinstance(error, str):  # reported by every worker at the next collect
            failed: Future = Future()
            failed.set_exception(RuntimeError(error))
            self.pending = (failed, trainer_version)
            return
        version = self.policy.version
        self.pending = (self.executor.submit(self._draw, need[self.rank :: self.world], version), version)

    def forget(self, trainer_version: int) -> None:
        """Drop samples too old to be used at ``trainer_version`` or later."""
        self.cache.prune(trainer_version, self.staleness)
        self.rollouts = {i: g for i, g in self.rollouts.items() if trainer_version - g[0].version <= self.staleness}

    # -- metrics, checkpoint state -----------------------------------------------------------------
    def _add(self, key: str, value: float) -> None:
        self.metrics[key] = self.metrics.get(key, 0.0) + value

    def take_metrics(self) -> dict[str, float]:
        out, self.metrics = self.metrics, {}
        return {**out, **self.policy.take_metrics(busy=self.pending is not None)}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (call ``settle`` first, on every worker)."""
        return {"p_mc_cache": self.cache.to_json(),
                "rollouts": {str(i): [[list(r.token_ids), r.reward, r.version] for r in g] for i, g in self.rollouts.items()},
                "pool_version": self.policy.version}

    def load_state(self, state: dict[str, Any]) -> None:
        """The samples of a checkpoint; the pool is created from the resumed weights, tagged with
        the resumed step, before its first sample (``pool_version`` is informational)."""
        self.cache = MonteCarloCache.from_json(state["p_mc_cache"])
        self.rollouts = {int(i): [Rollout(tuple(t), reward, version) for t, reward, version in g]
                         for i, g in state.get("rollouts", {}).items()}

    def close(self) -> None:
        self.policy.close()  # first: a running background draw then ends at once
        if self.verifier is not None:
            self.verifier.shutdown()
        self.executor.shutdown(wait=True, cancel_futures=True)


def _outcome(fn: Callable[[], Any]) -> Any:
    """``fn()``, or its error as a message (to be all-gathered rather than raised on one worker)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
