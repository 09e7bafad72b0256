"""Where a training step's sequences come from, and what each one's cross-entropy is multiplied by.

Every objective passn trains is one weighted cross-entropy with detached per-sequence
coefficients c_i (paper Eq. 4; docs/MATH.md):

    loss = (1 / S) sum_i c_i l_CE(x_i, y_i)          S = optim.sequences_per_step

    CE           c = 1
    DCO, DCOstep c = F(N', p(y | x)), from the step's own forward       (Section 4.4, 5.3)
    whole proof  c = F(N', prod_j p(y_j | x_j)) over the proof's steps  (Section 5.3)
    DCOa         c = F(N', p_MC), p_MC from the policy's own samples    (Section 5.4)
    Dr. GRPO     c = A_i = R_i - mean_j R_j, summed over tokens         (Appendix B)

So the objectives differ only in where batches come from, which is this module: a *batch source*
looks at the next candidates of the seeded stream, weighs them, keeps those whose weight reaches
``objective.refill_threshold`` (in order, until the step holds exactly S sequences: the refill)
and hands the step a :class:`TrainBatch`. The step never asks which objective it trains.

Sources are pure: what they need from the model or the cluster comes in as a :data:`Scorer` (log
p of examples under the current weights, no gradients), a :class:`Sampler` (the policy's own
samples, verified) and a :class:`passn.collective.Collective`, so each is unit-tested in one
process without Ray.

    source = make_batches(cfg, examples, stream, scorer=score, collective=OneProcess())
    batch = source.next_batch(step=0)        # TrainBatch: S examples and their coefficients
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from passn import objectives
from passn.collective import Collective
from passn.config import ConfigError, RunConfig
from passn.data import CandidateStream, Example, refill
from passn.objectives import CeNormalisation
from passn.online import Estimate, Rollout, p_mc_summary

# log p(completion | prompt) of each example under the current weights, float64, no gradients
Scorer = Callable[[Sequence[Example]], np.ndarray]


class Sampler(Protocol):
    """The policy's own verified samples of training prompts (DCOa, Dr. GRPO); samples drawn for
    trainer version v are usable while the trainer is at most ``objective.staleness`` ahead."""

    def estimates(self, indices: Sequence[int], trainer_version: int) -> list[Estimate]: ...
    def groups(self, indices: Sequence[int], trainer_version: int) -> list[list[Rollout]]: ...
    def prefetch(self, indices: Sequence[int], trainer_version: int) -> None: ...
    def forget(self, trainer_version: int) -> None: ...
    def settle(self) -> None: ...
    def take_metrics(self) -> dict[str, float]: ...
    def state(self) -> dict[str, Any]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------------------------------------
# A batch and its coefficients
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fixed:
    """Coefficients decided before the step (CE's 1, F(N', p_MC), a proof's F, an advantage)."""

    values: tuple[float, ...]

    def __call__(self, start: int, seq_logp_B: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.values[start : start + len(seq_logp_B)], dtype=torch.float64, device=seq_logp_B.device)

    def share(self, start: int, stop: int) -> Fixed:
        return Fixed(self.values[start:stop])


@dataclasses.dataclass(frozen=True)
class OwnCoverage:
    """c = F(N', p) with p the sequence's probability in the step's own forward (DCO, DCOstep):
    the gradient of -log(1 - (1 - p)^N') (paper Eq. 3-4)."""

    budget: float

    def __call__(self, start: int, seq_logp_B: torch.Tensor) -> torch.Tensor:
        return objectives.dco_weights(seq_logp_B, self.budget)

    def share(self, start: int, stop: int) -> OwnCoverage:
        return self


Coefficients = Fixed | OwnCoverage


@dataclasses.dataclass
class TrainBatch:
    """The sequences of one step and their coefficients, with what the refill looked at."""

    examples: list[Example]
    coefficients: Coefficients
    normalisation: CeNormalisation
    dropped: int = 0  # candidates looked at and not kept (weight below the threshold)
    candidates: int = 0  # candidates consumed from the stream
    looked_at: list = dataclasses.field(default_factory=list)  # Estimates or rollout groups, for the log

    def share(self, rank: int, world: int) -> TrainBatch:
        """Worker ``rank``'s contiguous share of the sequences."""
        per_worker = len(self.examples) // world
        start, stop = rank * per_worker, (rank + 1) * per_worker
        return dataclasses.replace(self, examples=self.examples[start:stop],
                                   coefficients=self.coefficients.share(start, stop))


def weighted_loss(token_logp_BT: torch.Tensor, mask_BT: torch.Tensor, coefficients: Coefficients, start: int,
                  normalisation: CeNormalisation) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_i l_CE(i), c_i) for the rows of a micro-batch starting at row ``start`` of its batch: the
    one loss every objective trains (objectives.weighted_ce_loss, c detached)."""
    coefficient_B = coefficients(start, objectives.sequence_logprob(token_logp_BT, mask_BT))
    return objectives.weighted_ce_loss(token_logp_BT, mask_BT, coefficient_B, normalisation), coefficient_B


def _ones(n: int) -> list[float]:
    return [1.0] * n


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


class _Refilled:
    """The refill every source shares: look at the next candidates, weigh them, keep in order
    those whose weight reaches the threshold until the step is full (passn.data.refill). A
    candidate after the last one kept is looked at again next round, with the updated model."""

    normalisation: CeNormalisation

    def __init__(self, examples: Sequence[Example], stream: CandidateStream, sequences_per_step: int,
                 threshold: float, normalisation: CeNormalisation) -> None:
        self.examples, self.stream, self.size = examples, stream, sequences_per_step
        self.threshold, self.normalisation = threshold, normalisation

    # what a source defines -----------------------------------------------------------------
    def per_candidate(self, step: int) -> int:
        """Sequences one kept candidate adds (a prompt's G rollouts for Dr. GRPO)."""
        return 1

    def weigh(self, window: list[int], step: int) -> tuple[list[float], float, list]:
        """(weight of each candidate, threshold, what was looked at per candidate)."""
        return _ones(len(window)), self.threshold, []

    def take(self, index: int, weight: float, looked: Any) -> list[tuple[Example, float]]:
        """The sequences of a kept candidate and their coefficients."""
        return [(self.examples[index], weight)]

    def coefficients(self, values: list[float]) -> Coefficients:
        return Fixed(tuple(values))

    def after(self, step: int) -> None:
        """Once the step's candidates are taken (a background draw of the next ones)."""

    # the refill ------------------------------------------------------------------------------
    def next_batch(self, step: int) -> TrainBatch:
        """The sequences of step ``step`` (0-based); fewer than S only at the end of the stream."""
        chosen: list[tuple[Example, float]] = []
        dropped = candidates = 0
        looked_at: list = []
        group = self.per_candidate(step)
        while len(chosen) < self.size and not self.stream.finished:
            window = self.stream.peek(self.size // group)
            weights, threshold, looked = self.weigh(window, step)
            outcome = refill(weights, threshold, (self.size - len(chosen)) // group)
            for p in outcome.chosen:
                chosen += self.take(window[p], weights[p], looked[p] if looked else None)
            looked_at += looked[: outcome.consumed]
            dropped += outcome.dropped
            candidates += outcome.consumed
            self.stream.advance(outcome.consumed)
        self.after(step)
        return TrainBatch([e for e, _ in chosen], self.coefficients([c for _, c in chosen]), self.normalisation,
                          dropped, candidates, looked_at)

    def report(self, batch: TrainBatch, step: int) -> dict[str, Any]:
        """Metrics of the step just trained (``step`` is the new trainer version)."""
        return {}

    def settle(self) -> None:
        """Before a checkpoint: nothing left in flight."""

    def state(self) -> dict[str, Any]:
        return {"data_position": self.stream.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.stream.epoch, self.stream.cursor = state["data_position"]["epoch"], state["data_position"]["cursor"]


class ReferenceBatches(_Refilled):
    """CE: the dataset's reference completions, every one kept, coefficient 1."""


class CoverageBatches(_Refilled):
    """DCO and DCOstep: the references, each with c = F(N', p) from the step's forward. With a
    refill threshold the candidates are scored first (each worker its share, gathered), and those
    with F below it are dropped: their CE gradient is already near 0."""

    def __init__(self, *args, budget: float, scorer: Scorer, collective: Collective, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.budget, self.scorer, self.collective = budget, scorer, collective

    def weigh(self, window: list[int], step: int) -> tuple[list[float], float, list]:
        if self.threshold <= 0:  # every candidate is kept: no forward before the step's own
            return _ones(len(window)), self.threshold, []
        c = self.collective
        mine = window[c.rank :: c.world]
        seq_logp = torch.from_numpy(self.scorer([self.examples[i] for i in mine]))
        weights = [0.0] * len(window)
        for rank, part in enumerate(c.gather(objectives.dco_weights(seq_logp, self.budget).tolist())):
            weights[rank :: c.world] = part
        return weights, self.threshold, []

    def coefficients(self, values: list[float]) -> Coefficients:
        return OwnCoverage(self.budget)


class ProofBatches(_Refilled):
    """Whole-proof DCO: every step of a proof is weighed by F(N', prod of the probabilities of
    all the proof's steps in the training data), computed without gradients before the step."""

    def __init__(self, *args, budget: float, proof_of: Sequence[str], scorer: Scorer, collective: Collective,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.budget, self.proof_of, self.scorer, self.collective = budget, proof_of, scorer, collective
        self.steps_of: dict[str, list[int]] = {}
        for i, proof in enumerate(proof_of):
            self.steps_of.setdefault(proof, []).append(i)

    def proof_logp(self, proofs: set[str]) -> dict[str, float]:
        """log prod_j p(y_j | x_j) over each proof's steps."""
        ordered = sorted(proofs)
        members = [j for proof in ordered for j in self.steps_of[proof]]
        logp = self.scorer([self.examples[j] for j in members])
        out, position = {}, 0
        for proof in ordered:
            out[proof] = float(logp[position : position + len(self.steps_of[proof])].sum())
            position += len(self.steps_of[proof])
        return out

    def weigh(self, window: list[int], step: int) -> tuple[list[float], float, list]:
        c = self.collective
        mine = window[c.rank :: c.world]
        logp = self.proof_logp({self.proof_of[i] for i in mine})
        local = objectives.coverage_weight_from_logp(
            self.budget, torch.tensor([logp[self.proof_of[i]] for i in mine], dtype=torch.float64))
        weights = [0.0] * len(window)
        for rank, part in enumerate(c.gather(local.tolist())):
            weights[rank :: c.world] = part
        return weights, self.threshold, []


class _Online(_Refilled):
    """A source that reads the policy's own samples; reports the sampler's side of each step."""

    def __init__(self, *args, sampler: Sampler, collective: Collective, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sampler, self.collective = sampler, collective

    def after(self, step: int) -> None:  # staleness 1: the next step's candidates, sampled while this one trains
        self.sampler.prefetch(self.stream.peek(self.size // self.per_candidate(step)), step)

    def report(self, batch: TrainBatch, step: int) -> dict[str, Any]:
        parts = self.collective.gather(self.sampler.take_metrics())
        out: dict[str, Any] = dict(parts[0])
        for key in ("sync_s", "sync_logp_gap", "sync_logp_gap_per_token"):  # as the slowest worker saw them
            values = [p[key] for p in parts if key in p]
            if values:
                out[key] = max(values)
        out.update(self.summary(batch.looked_at, step - 1))
        self.sampler.forget(step)
        return out

    def summary(self, looked_at: list, trainer_version: int) -> dict[str, Any]:
        return p_mc_summary(looked_at, trainer_version)

    def settle(self) -> None:
        self.sampler.settle()  # a background draw joins the cache (collective: every worker is here)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "online": self.sampler.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        if "online" in state:
            self.sampler.load_state(state["online"])


class SampledBatches(_Online):
    """DCOa: the reference chains of thought, each with c = F(N', p_MC), p_MC = correct / k over
    k samples of its prompt from the policy at most ``objective.staleness`` versions old."""

    def __init__(self, *args, budget: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.budget = budget

    def weigh(self, window: list[int], step: int) -> tuple[list[float], float, list]:
        estimates = self.sampler.estimates(window, step)
        weights = objectives.dcoa_weights(torch.tensor([e.correct for e in estimates]),
                                          torch.tensor([e.samples for e in estimates]), self.budget).tolist()
        return weights, self.threshold, estimates


class RolloutBatches(_Online):
    """Dr. GRPO: G verified rollouts of each prompt with c = A_i = R_i - mean R and no length
    normalisation (summed over tokens: the step's 1/S then averages -J over prompts, with J =
    (1/G) sum_i A_i sum_t log p). Groups whose rewards are all equal carry no signal and are
    dropped (batch balancing)."""

    def __init__(self, *args, group_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group_size = group_size

    def per_candidate(self, step: int) -> int:
        return self.group_size

    def weigh(self, window: list[int], step: int) -> tuple[list[float], float, list]:
        groups = self.sampler.groups(window, step)
        rewards = torch.tensor([[r.reward for r in g] for g in groups])
        return objectives.balanced_groups(rewards).double().tolist(), 1.0, groups

    def take(self, index: int, weight: float, looked: Any) -> list[tuple[Example, float]]:
        reference = self.examples[index]
        prompt = reference.input_ids[: reference.completion_start]
        advantages = objectives.group_advantages(torch.tensor([[r.reward for r in looked]]))[0].tolist()
        return [(Example(f"{reference.uid}#{j}", prompt + r.token_ids, len(prompt)), a)
                for j, (r, a) in enumerate(zip(looked, advantages))]

    def summary(self, looked_at: list, trainer_version: int) -> dict[str, Any]:
        return p_mc_summary([Estimate(int(sum(r.reward for r in g)), len(g), g[0].version) for g in looked_at],
                            trainer_version, name="reward")


class CEWarmUp:
    """The first ``steps`` steps train CE on the references, then ``then`` takes over the same stream."""

    def __init__(self, warm: ReferenceBatches, then: _Online, steps: int) -> None:
        self.warm, self.then, self.steps = warm, then, steps

    def next_batch(self, step: int) -> TrainBatch:
        return (self.warm if step < self.steps else self.then).next_batch(step)

    def __getattr__(self, name: str):  # report, settle, state, load_state: the online source's
        return getattr(self.then, name)


BatchSource = ReferenceBatches | CoverageBatches | ProofBatches | SampledBatches | RolloutBatches | CEWarmUp
ONLINE_KINDS = ("dcoa", "dr_grpo")


def make_batches(cfg: RunConfig, examples: Sequence[Example], stream: CandidateStream, *, collective: Collective,
                 scorer: Scorer | None = None, sampler: Sampler | None = None,
                 proof_of: Sequence[str] | None = None) -> BatchSource:
    """The batch source of ``cfg.objective``: the one place that reads ``objective.kind``."""
    o = cfg.objective
    common: dict[str, Any] = dict(examples=examples, stream=stream, sequences_per_step=cfg.optim.sequences_per_step,
                                  threshold=o.refill_threshold, normalisation=o.ce_normalisation)
    if o.kind in ONLINE_KINDS:
        if sampler is None:
            raise ConfigError(f"objective.kind = {o.kind} samples the policy during training: it needs a sampler")
        if o.kind == "dcoa":
            online: _Online = SampledBatches(**common, sampler=sampler, collective=collective, budget=o.budget)
        else:
            online = RolloutBatches(**{**common, "normalisation": "sequence_sum"}, sampler=sampler,
                                    collective=collective, group_size=o.group_size)
        return CEWarmUp(ReferenceBatches(**common), online, o.ce_warmup_steps)
    if o.kind == "ce":
        return ReferenceBatches(**common)
    if o.kind in ("dco", "dco_step") and o.whole_proof:
        if proof_of is None or scorer is None:
            raise ConfigError("objective.whole_proof weighs each step by its proof: it needs the proofs and a scorer")
        return ProofBatches(**common, budget=o.budget, proof_of=proof_of, scorer=scorer, collective=collective)
    if o.kind in ("dco", "dco_step"):
        if scorer is None and o.refill_threshold > 0:
            raise ConfigError("objective.refill_threshold > 0 scores candidates before the step: it needs a scorer")
        return CoverageBatches(**common, budget=o.budget, scorer=scorer, collective=collective)  # type: ignore[arg-type]
    raise ConfigError(f"objective.kind = {o.kind!r} has no batch source")


def steps_total(cfg: RunConfig, num_examples: int) -> int:
    """Steps of the whole run when nothing is dropped (for the log's ``step s/total``)."""
    size, epochs = cfg.optim.sequences_per_step, cfg.optim.epochs
    total = epochs * num_examples // size
    if cfg.objective.kind == "dr_grpo":  # after the CE warm-up a step consumes S / G prompts
        warm = min(cfg.objective.ce_warmup_steps, total)
        total = warm + (epochs * num_examples - warm * size) // (size // cfg.objective.group_size)
    return total
