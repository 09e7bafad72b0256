"""passn.evaluation: exact reference confidences and greedy answers from a real (tiny) Llama."""

import math

import pytest
import torch

from passn.config import TinyModelSpec
from passn.data import encode_examples
from passn.evaluation import greedy_answers, sequence_logprobs
from passn.models import PAD_ID, build_tiny_model
from passn.tasks import SyntheticTask


@pytest.fixture(scope="module")
def model_and_task():
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model(TinyModelSpec(), seed=0)
    model.eval()
    return model, tokenizer, SyntheticTask(seed=0, num_train=4, num_test=8)


def test_sequence_logprobs_match_a_manual_forward(model_and_task):
    model, tokenizer, task = model_and_task
    problems = task.problems("test")
    examples = encode_examples(tokenizer, task, problems, 64)
    got = sequence_logprobs(model, examples, PAD_ID, batch_size=3)  # uneven batches on purpose
    for e, value in zip(examples, got):
        ids = torch.tensor([e.input_ids])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        manual = sum(logp[t - 1, ids[0, t]].item() for t in range(e.completion_start, len(e.input_ids)))
        assert value == pytest.approx(manual, abs=1e-5)


def test_greedy_answers_are_argmax_paths_with_exact_confidence(model_and_task):
    model, tokenizer, task = model_and_task
    prompts = [task.render_prompt(p) for p in task.problems("test")]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=4, batch_size=5)
    for prompt, (text, confidence) in zip(prompts, answers):
        ids = tokenizer(prompt).input_ids
        logp = 0.0
        for _ in range(4):
            dist = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            token = int(dist.argmax())
            logp += dist[token].item()
            if token == tokenizer.eos_token_id:
                break
            ids.append(token)
        assert text == tokenizer.decode(ids[len(tokenizer(prompt).input_ids):], skip_special_tokens=True)
        assert confidence == pytest.approx(math.exp(logp), rel=1e-6)


def test_sampled_correct_counts_verify_every_sample(model_and_task):
    from passn.evaluation import sampled_correct_counts

    model, tokenizer, task = model_and_task
    problems = task.problems("test")[:3]
    prompts = [task.render_prompt(p) for p in problems]
    counts = sampled_correct_counts(model, tokenizer, task, problems, prompts, samples=32, temperature=1.0,
                                    max_new_tokens=4, seed=0)
    assert len(counts) == 3 and all(0 <= c <= 32 for c in counts)
    # feeding the reference answers themselves through the same verifier counts them correct
    assert [v.correct for v in task.check_many(problems, [task.reference_completion(p) for p in problems])] == \
        [True] * 3
