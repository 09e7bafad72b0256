"""passn.generation: KV-cache sampling on a real (tiny) Llama, checked against full forwards."""

import math

import pytest
import torch

from passn.config import TinyModelSpec
from passn.generation import sample_tokens
from passn.models import EOS_ID, PAD_ID, build_tiny_model


@pytest.fixture(scope="module")
def model():
    model, _ = build_tiny_model(TinyModelSpec(), seed=0)
    return model.eval()


PROMPTS = [[1, 14, 15, 16, 3], [1, 20, 3], [1, 30, 31, 32, 33, 34, 35, 3]]  # uneven lengths: left padding


def teacher_forced_logp(model, prompt, tokens):
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens))


def full_recompute_greedy(model, prompt, max_new_tokens):
    ids = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token == EOS_ID:
            break
    return tuple(ids[len(prompt):])


@pytest.mark.parametrize("sync_every", [1, 5])
def test_greedy_equals_recomputing_every_step_without_a_cache(model, sync_every):
    rows = sample_tokens(model, PROMPTS, samples=1, temperature=0.0, max_new_tokens=12, seed=0, eos_ids={EOS_ID},
                         pad_id=PAD_ID, sync_every=sync_every)
    for prompt, (row,) in zip(PROMPTS, rows):
        assert row.token_ids == full_recompute_greedy(model, prompt, 12)
        assert row.cumulative_logprob == pytest.approx(teacher_forced_logp(model, prompt, row.token_ids), abs=1e-5)


@pytest.mark.parametrize("sync_every", [1, 8])
def test_samples_carry_their_exact_logprob_and_stop_at_eos(model, sync_every):
    # a small batch cap forces several groups; many rows stop early, so the batch shrinks mid-decode;
    # with sync_every 8, rows decode past their <eos> until the next sync and those tokens are dropped
    rows = sample_tokens(model, PROMPTS, samples=24, temperature=1.0, max_new_tokens=40, seed=1, eos_ids={EOS_ID},
                         pad_id=PAD_ID, max_rows=30, sync_every=sync_every)
    assert [len(r) for r in rows] == [24, 24, 24]
    reasons = {s.finish_reason for r in rows for s in r}
    assert reasons == {"stop", "length"}  # both kinds happened, so rows left the batch mid-decode
    for prompt, samples in zip(PROMPTS, rows):
        for s in samples[:8]:
            assert (s.token_ids[-1] == EOS_ID) == (s.finish_reason == "stop")
            assert EOS_ID not in s.token_ids[:-1]
            assert s.cumulative_logprob == pytest.approx(teacher_forced_logp(model, prompt, s.token_ids), abs=1e-4)


def test_seeded_sampling_is_deterministic_and_follows_the_model(model):
    a = sample_tokens(model, PROMPTS[:1], samples=4000, temperature=1.0, max_new_tokens=1, seed=5, eos_ids={EOS_ID},
                      pad_id=PAD_ID, max_rows=4000)
    b = sample_tokens(model, PROMPTS[:1], samples=4000, temperature=1.0, max_new_tokens=1, seed=5, eos_ids={EOS_ID},
                      pad_id=PAD_ID, max_rows=4000)
    assert a == b
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([PROMPTS[0]])).logits[0, -1].double(), -1)
    counts = torch.bincount(torch.tensor([s.token_ids[0] for s in a[0]]), minlength=len(probs)).double()
    # every first-token frequency within 5 standard errors of the model's probability
    stderr = (probs * (1 - probs) / 4000).sqrt()
    assert bool(((counts / 4000 - probs).abs() <= 5 * stderr + 1e-3).all())
    assert all(math.isfinite(s.cumulative_logprob) for s in a[0])


def test_rejects_greedy_with_several_samples(model):
    with pytest.raises(ValueError, match="greedy"):
        sample_tokens(model, PROMPTS, samples=2, temperature=0.0, max_new_tokens=2, seed=0, eos_ids={EOS_ID},
                      pad_id=PAD_ID)


def test_prompt_seeds_give_every_sample_of_every_prompt_its_own_stream():
    from passn.sampling import SEED_SPACE, plan_work, prompt_seed

    # 5 prompts x 1024 samples in chunks of 256; vLLM seeds sample j of a request with seed + j
    used = [prompt_seed(3, p, u.first_sample) + j for u in plan_work(5, 1024, 256, 2) for p in u.prompt_indices
            for j in range(u.samples)]
    assert len(used) == len(set(used)) == 5 * 1024 and max(used) < SEED_SPACE + 1024
    assert prompt_seed(3, 0) != prompt_seed(4, 0) and prompt_seed(3, 0, 256) == prompt_seed(3, 0) + 256
