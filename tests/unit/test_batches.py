"""passn.batches: what each objective's batch source keeps and the coefficient it gives, in one
process (and in two threads standing in for two workers, to show the decisions do not depend on
the number of workers)."""

import math
import threading

import numpy as np
import pytest
import torch

from passn import objectives as obj
from passn.batches import (CEWarmUp, CoverageBatches, Fixed, OwnCoverage, ProofBatches, ReferenceBatches,
                           RolloutBatches, SampledBatches, make_batches, steps_total, weighted_loss)
from passn.collective import OneProcess
from passn.config import load_config
from passn.data import CandidateStream, Example
from passn.online import Estimate, Rollout


def examples(n):
    # prompt (1, 10 + i), completion (50 + i, 2): uid "e{i}"
    return [Example(f"e{i}", (1, 10 + i, 50 + i, 2), 2) for i in range(n)]


def by_uid(logp):
    """A scorer reading each example's log p from a table (the model's role, in hand numbers)."""
    return lambda exs: np.array([logp[e.uid] for e in exs], dtype=np.float64)


def order(stream, epoch=0):
    return [int(i) for i in stream.order(epoch)]


class Threads:
    """A collective of ``world`` threads (one per worker) meeting at a barrier."""

    def __init__(self, world):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)

    def view(self, rank):
        outer = self

        class View:
            def __init__(self):
                self.rank, self.world = rank, outer.world

            def gather(self, obj):
                outer.barrier.wait()
                outer.slots[rank] = obj
                outer.barrier.wait()
                out = list(outer.slots)
                outer.barrier.wait()
                return out

        return View()


def run_workers(world, make):
    """``make(collective)`` -> list of results, on ``world`` threads; all workers' results."""
    threads = Threads(world)
    out = [None] * world

    def work(rank):
        out[rank] = make(threads.view(rank))

    ts = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    [t.start() for t in ts]
    [t.join(timeout=60) for t in ts]
    return out


# ---------------------------------------------------------------------------------------------
# CE and DCO
# ---------------------------------------------------------------------------------------------


def test_reference_batches_keep_every_candidate_in_stream_order_with_coefficient_one():
    stream = CandidateStream(10, epochs=1, seed=3)
    source = ReferenceBatches(examples(10), stream, 4, threshold=0.0, normalisation="sequence_sum")
    first = source.next_batch(0)
    assert [e.uid for e in first.examples] == [f"e{i}" for i in order(stream)[:4]]
    assert first.coefficients == Fixed((1.0,) * 4) and first.dropped == 0 and first.candidates == 4
    source.next_batch(1)
    last = source.next_batch(2)  # 10 = 4 + 4 + 2: the end of the stream leaves a short batch
    assert len(last.examples) == 2 and stream.finished


def test_dco_refill_drops_confident_candidates_and_fills_the_step_exactly():
    stream = CandidateStream(8, epochs=1, seed=0)
    ids = order(stream)
    # candidates in stream order: p = 0.9 for the 1st and 3rd (F(4, 0.9) = 0.0009 < 0.3), else p = 0.1
    logp = {f"e{i}": math.log(0.9 if position in (0, 2) else 0.1) for position, i in enumerate(ids)}
    source = CoverageBatches(examples(8), stream, 4, threshold=0.3, normalisation="sequence_sum", budget=4,
                             scorer=by_uid(logp), collective=OneProcess())
    batch = source.next_batch(0)
    # the first window (4) keeps positions 1 and 3; the second round looks at the next 2 (positions 4, 5)
    assert [e.uid for e in batch.examples] == [f"e{ids[p]}" for p in (1, 3, 4, 5)]
    assert batch.dropped == 2 and batch.candidates == 6
    assert batch.coefficients == OwnCoverage(4)  # F from the step's own forward, not the score


def test_dco_without_a_threshold_scores_nothing_before_the_step():
    def no_scoring(exs):
        raise AssertionError("scored")

    source = CoverageBatches(examples(8), CandidateStream(8, 1, 0), 4, threshold=0.0, normalisation="sequence_sum",
                             budget=64, scorer=no_scoring, collective=OneProcess())
    assert len(source.next_batch(0).examples) == 4


def test_two_workers_take_the_same_decisions_as_one():
    logp = {f"e{i}": math.log(0.05 + 0.9 * ((i * 7) % 11) / 10) for i in range(24)}

    def uids(collective):
        source = CoverageBatches(examples(24), CandidateStream(24, 2, 5), 6, threshold=0.2,
                                 normalisation="sequence_sum", budget=8, scorer=by_uid(logp), collective=collective)
        return [[e.uid for e in source.next_batch(s).examples] for s in range(3)]

    one = uids(OneProcess())
    assert run_workers(2, uids) == [one, one]
    assert run_workers(3, uids) == [one, one, one]


def test_whole_proof_weighs_every_step_by_its_proofs_probability():
    # proof A: steps e0 (p 0.5), e2 (p 0.4), p_A = 0.2; proof B: e1 (p 0.9)
    logp = {"e0": math.log(0.5), "e1": math.log(0.9), "e2": math.log(0.4)}
    stream = CandidateStream(3, epochs=1, seed=0)
    source = ProofBatches(examples(3), stream, 3, threshold=0.0, normalisation="sequence_sum", budget=4,
                          proof_of=["A", "B", "A"], scorer=by_uid(logp), collective=OneProcess())
    batch = source.next_batch(0)
    want = {"e0": obj.coverage_weight(4, 0.2), "e1": obj.coverage_weight(4, 0.9), "e2": obj.coverage_weight(4, 0.2)}
    assert isinstance(batch.coefficients, Fixed)
    for e, c in zip(batch.examples, batch.coefficients.values):
        assert c == pytest.approx(float(want[e.uid]), rel=1e-12)
    # the proof is less likely than each of its steps: its F is larger than either step's own
    assert float(want["e0"]) > float(obj.coverage_weight(4, 0.5))


# ---------------------------------------------------------------------------------------------
# DCOa and Dr. GRPO (a sampler with fixed verified samples: the policy's role)
# ---------------------------------------------------------------------------------------------


class FixedSamples:
    def __init__(self, correct=None, rewards=None, k=8):
        self.correct, self.rewards, self.k = correct or {}, rewards or {}, k
        self.prefetched, self.forgotten = [], []

    def estimates(self, indices, trainer_version):
        return [Estimate(self.correct[i], self.k, trainer_version) for i in indices]

    def groups(self, indices, trainer_version):
        return [[Rollout((60 + j, 2), r, trainer_version) for j, r in enumerate(self.rewards[i])] for i in indices]

    def prefetch(self, indices, trainer_version):
        self.prefetched.append((list(indices), trainer_version))

    def forget(self, trainer_version):
        self.forgotten.append(trainer_version)

    def settle(self):
        pass

    def take_metrics(self):
        return {"sampled_tokens": 0.0}

    def state(self):
        return {"k": self.k}

    def load_state(self, state):
        self.k = state["k"]


def test_dcoa_coefficient_is_the_coverage_weight_of_the_monte_carlo_estimate():
    stream = CandidateStream(6, epochs=1, seed=1)
    # 8 of 8 correct: F(16, 1) = 0 (dropped at threshold 0.01); 1 of 8: F(16, 1/8) ~ 0.15
    sampler = FixedSamples(correct={i: 8 if i % 3 == 0 else 1 for i in range(6)})
    source = SampledBatches(examples(6), stream, 2, threshold=0.01, normalisation="sequence_sum", budget=16,
                            sampler=sampler, collective=OneProcess())
    batch = source.next_batch(0)
    kept = [int(e.uid[1:]) for e in batch.examples]
    assert all(i % 3 for i in kept) and len(kept) == 2
    assert batch.coefficients.values == pytest.approx([float(obj.coverage_weight(16, 1 / 8))] * 2, rel=1e-12)
    assert sampler.prefetched == [(stream.peek(2), 0)]  # the next step's candidates, sampled while this one trains
    looked = order(stream)[: batch.candidates]  # every candidate consumed, kept or not
    report = source.report(batch, 1)
    assert report["p_mc_mean"] == pytest.approx(np.mean([sampler.correct[i] / 8 for i in looked]))
    assert report["sampled_tokens"] == 0.0 and sampler.forgotten == [1]


def test_dr_grpo_trains_the_rollouts_of_balanced_groups_with_their_advantages():
    stream = CandidateStream(4, epochs=1, seed=0)
    ids = order(stream)
    # stream order: all right (skipped), (1, 0), all wrong (skipped), (0, 1)
    rewards = {ids[0]: [1.0, 1.0], ids[1]: [1.0, 0.0], ids[2]: [0.0, 0.0], ids[3]: [0.0, 1.0]}
    source = RolloutBatches(examples(4), stream, 4, threshold=0.0, normalisation="sequence_sum", group_size=2,
                            sampler=FixedSamples(rewards=rewards), collective=OneProcess())
    batch = source.next_batch(0)
    assert [e.uid for e in batch.examples] == [f"e{ids[1]}#0", f"e{ids[1]}#1", f"e{ids[3]}#0", f"e{ids[3]}#1"]
    assert batch.coefficients.values == (0.5, -0.5, -0.5, 0.5)
    assert batch.dropped == 2 and batch.candidates == 4
    first = batch.examples[0]  # the prompt of the reference, then the rollout's tokens
    assert first.input_ids == (1, 10 + ids[1], 60, 2) and first.completion_start == 2


def test_dr_grpo_step_loss_is_minus_j_averaged_over_prompts():
    # two prompts x two rollouts, advantages +-1/2; sequence log-probs s = -1, -2, -3, -4
    token_logp = torch.tensor([[-1.0], [-2.0], [-3.0], [-4.0]], dtype=torch.float64)
    loss_B, _ = weighted_loss(token_logp, torch.ones(4, 1), Fixed((0.5, -0.5, -0.5, 0.5)), 0, "sequence_sum")
    step_loss = float(loss_B.sum() / 4)  # what the step back-propagates: (1/S) sum c_i l_CE(i)
    # by hand: J_p = (1/G) sum_i A_i s_i; prompt 0: (0.5 * -1 - 0.5 * -2) / 2 = 0.25; prompt 1: (-0.5 * -3 + 0.5 * -4) / 2 = -0.25
    assert step_loss == pytest.approx(-(0.25 + -0.25) / 2)
    assert float(loss_B[0]) == pytest.approx(0.5)


def test_the_ce_warm_up_trains_references_then_hands_over_the_same_stream():
    stream = CandidateStream(8, epochs=1, seed=0)
    sampler = FixedSamples(correct={i: 0 for i in range(8)})
    common = dict(examples=examples(8), stream=stream, sequences_per_step=2, threshold=0.0, normalisation="token_mean")
    source = CEWarmUp(ReferenceBatches(**common), SampledBatches(**common, budget=4, sampler=sampler,
                                                                 collective=OneProcess()), steps=1)
    warm = source.next_batch(0)
    assert warm.coefficients == Fixed((1.0, 1.0)) and sampler.prefetched == []
    online = source.next_batch(1)
    assert online.coefficients == Fixed((1.0, 1.0))  # p_MC = 0: F = 1
    assert sampler.prefetched and stream.cursor == 4
    assert source.state() == {"data_position": {"epoch": 0, "cursor": 4}, "online": {"k": 8}}


def test_make_batches_reads_the_objective_and_states_what_a_source_needs():
    cfg = lambda *o: load_config(None, ["resources.num_workers=1", *o])  # noqa: E731
    exs, one = examples(8), OneProcess()
    stream = lambda: CandidateStream(8, 1, 0)  # noqa: E731
    assert type(make_batches(cfg(), exs, stream(), collective=one)) is ReferenceBatches
    assert type(make_batches(cfg("objective.kind=dco", "objective.budget=8"), exs, stream(), collective=one)) is CoverageBatches
    with pytest.raises(Exception, match="needs a scorer"):
        make_batches(cfg("objective.kind=dco", "objective.budget=8", "objective.refill_threshold=0.1"), exs, stream(),
                     collective=one)
    with pytest.raises(Exception, match="needs a sampler"):
        make_batches(cfg("objective.kind=dcoa", "objective.budget=8", "task.variant=cot"), exs, stream(), collective=one)
    grpo = make_batches(cfg("objective.kind=dr_grpo", "objective.group_size=2", "task.variant=cot"), exs, stream(), collective=one,
                        sampler=FixedSamples())
    assert type(grpo) is CEWarmUp and type(grpo.then) is RolloutBatches and grpo.then.normalisation == "sequence_sum"


def test_steps_total_counts_dr_grpo_steps_in_prompts_after_the_warm_up():
    cfg = load_config(None, ["resources.num_workers=1", "objective.kind=dr_grpo", "objective.group_size=4", "task.variant=cot",
                             "objective.ce_warmup_steps=2", "optim.sequences_per_step=8", "optim.epochs=1"])
    # 40 examples: 2 warm-up steps take 16, then 8 / 4 = 2 prompts a step: 24 / 2 = 12 more
    assert steps_total(cfg, 40) == 14
