"""Exact evaluation from a model's own probabilities (no sampling), for direct-answer tasks.

- :func:`sequence_logprobs`: log p(reference completion | prompt) per problem, which gives exact
  pass@k = 1 - (1 - p)^k for tasks whose correct answer is one string (MATH.md section 1).
- :func:`greedy_answers`: the greedy completion and its exact confidence, the paper's
  max-confidence measurement (Section 4.3, Figure 1).

Shape legend: B = sequences, T = tokens, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from passn import objectives
from passn.data import Example, collate
from passn.generation import sample_tokens


@torch.no_grad()
def sequence_logprobs(model, examples: Sequence[Example], pad_id: int, batch_size: int = 256) -> np.ndarray:
    """log p(completion | prompt) for each example, in float64 (completion includes <eos>)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        logits_BTV = model(input_ids=batch["inputs_BT"], attention_mask=batch["attention_BT"]).logits
        token_logp_BT = objectives.token_logprobs(logits_BTV, batch["targets_BT"])
        out.append(objectives.sequence_logprob(token_logp_BT.double(), batch["mask_BT"]).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                   batch_size: int = 256) -> list[tuple[str, float]]:
    """(completion text, exact confidence) of the greedy completion of each prompt.

    Greedy decoding (temperature 0) picks the argmax token at each step; its confidence is the
    product of those tokens' probabilities up to and including <eos>.
    """
    encoded = [tokenizer(p).input_ids for p in prompts]
    rows = sample_tokens(model, encoded, samples=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=0,
                         eos_ids={tokenizer.eos_token_id}, pad_id=tokenizer.pad_token_id, max_rows=batch_size)
    return [(tokenizer.decode(row[0].token_ids, skip_special_tokens=True), float(np.exp(row[0].cumulative_logprob)))
            for row in rows]


def sampled_correct_counts(model, tokenizer, task, problems: Sequence[Any], prompts: Sequence[str], samples: int,
                           temperature: float, max_new_tokens: int, seed: int, max_rows: int = 1024) -> list[int]:
    """How many of ``samples`` sampled completions of each prompt the task's verifier accepts
    (pass@k by sampling, for tasks whose correct answers cannot be enumerated: chain of thought)."""
    encoded = [tokenizer(p).input_ids for p in prompts]
    rows = sample_tokens(model, encoded, samples, temperature, max_new_tokens, seed, eos_ids={tokenizer.eos_token_id},
                         pad_id=tokenizer.pad_token_id, max_rows=max_rows)
    counts = []
    for problem, row in zip(problems, rows):
        texts = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in row]
        counts.append(sum(v.correct for v in task.check_many([problem] * len(texts), texts)))
    return counts
