"""Online-sampling bookkeeping (passn.online) and the Dr. GRPO loss the training loop applies."""

import math

import pytest
import torch

from passn.config import TinyModelSpec
from passn.data import Example, collate
from passn.models import EOS_ID, PAD_ID, build_tiny_model
from passn.online import Estimate, MonteCarloCache, p_mc_summary


def test_cache_uses_estimates_at_most_staleness_versions_old_and_round_trips():
    cache = MonteCarloCache()
    cache.put(1, correct=3, samples=8, version=4)
    cache.put(2, correct=0, samples=8, version=5)
    cache.put(3, correct=8, samples=8, version=2)
    assert cache.usable([1, 2, 3, 9], trainer_version=5, staleness=0) == {2}
    assert cache.usable([1, 2, 3, 9], trainer_version=5, staleness=1) == {1, 2}
    assert cache.usable([2], trainer_version=4, staleness=1) == set()  # drawn by a newer policy: not for this step
    assert MonteCarloCache.from_json(cache.to_json()).entries == cache.entries
    cache.prune(trainer_version=5, staleness=1)
    assert set(cache.entries) == {1, 2}
    with pytest.raises(ValueError, match="example 7"):
        cache.put(7, correct=9, samples=8, version=0)


def test_p_mc_summary_reports_the_distribution_and_the_worst_staleness():
    s = p_mc_summary([Estimate(0, 4, 3), Estimate(2, 4, 2), Estimate(4, 4, 3)], trainer_version=3)
    assert s["p_mc_mean"] == pytest.approx(0.5) and s["p_mc_min"] == 0 and s["p_mc_max"] == 1
    assert s["p_mc_zero"] == pytest.approx(1 / 3) and s["p_mc_one"] == pytest.approx(1 / 3)
    assert s["staleness"] == 1 and s["policy_v"] == 2
    assert p_mc_summary([], 0) == {}


def test_dr_grpo_loss_of_the_training_loop_equals_the_hand_computation():
    from passn import objectives
    from passn.batches import Fixed, weighted_loss

    model, _ = build_tiny_model(TinyModelSpec(), seed=3)
    prompts = [(1, 14, 15), (1, 20, 21, 22)]
    # two prompts x two rollouts; rewards (1, 0) and (0, 1): advantages +-1/2
    rollouts = [(prompts[0], (30, 31, EOS_ID), 1.0), (prompts[0], (32, EOS_ID), 0.0),
                (prompts[1], (33, EOS_ID), 0.0), (prompts[1], (34, 35, 36, EOS_ID), 1.0)]
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    advantages = objectives.group_advantages(rewards).flatten()
    assert advantages.tolist() == [0.5, -0.5, -0.5, 0.5]
    examples = [Example(f"r{i}", p + c, len(p)) for i, (p, c, _) in enumerate(rollouts)]
    batch = collate(examples, PAD_ID)
    with torch.no_grad():
        logits = model(input_ids=batch["inputs_BT"], attention_mask=batch["attention_BT"]).logits
    token_logp = objectives.token_logprobs(logits, batch["targets_BT"])
    # what RolloutBatches gives the step: c = A, summed over tokens
    loss_B, _ = weighted_loss(token_logp, batch["mask_BT"], Fixed(tuple(advantages.tolist())), 0, "sequence_sum")
    step_loss = float(loss_B.sum() / len(examples))  # what the loop back-propagates

    # by hand: -J averaged over prompts, J = (1/G) sum_i A_i sum_t log p(o_i,t | q, o_i,<t)
    def logp(prompt, completion):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].double(), -1)
        return sum(lp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(completion))

    G, P = 2, 2
    by_hand = 0.0
    for p in range(P):
        J = sum(float(advantages[p * G + i]) * logp(*rollouts[p * G + i][:2]) for i in range(G)) / G
        by_hand += -J / P
    assert math.isfinite(step_loss) and step_loss == pytest.approx(by_hand, rel=1e-5, abs=1e-6)
