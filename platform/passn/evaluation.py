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

from passn import coverage, objectives
from passn.data import Example, collate


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


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                   batch_size: int = 256) -> list[tuple[str, float]]:
    """(completion text, exact confidence) of the greedy completion of each prompt.

    Greedy decoding (temperature 0) picks the argmax token at each step; its confidence is the
    product of those tokens' probabilities up to and including <eos>.
    """
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    results: list[tuple[str, float]] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p).input_ids for p in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        # left padding so that every row's next token sits at the last position
        ids_BT = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
        attention_BT = (torch.arange(width, device=device)[None, :] >= (width - torch.tensor([len(i) for i in encoded], device=device))[:, None]).long()
        logp_B = torch.zeros(len(encoded), dtype=torch.float64, device=device)
        done_B = torch.zeros(len(encoded), dtype=torch.bool, device=device)
        chosen: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            position_BT = (attention_BT.cumsum(-1) - 1).clamp(min=0)
            logits_BV = model(input_ids=ids_BT, attention_mask=attention_BT, position_ids=position_BT).logits[:, -1]
            token_logp_BV = torch.log_softmax(logits_BV.double(), -1)
            token_B = token_logp_BV.argmax(-1)
            finished_B = done_B.clone()  # rows past <eos> append padding that nothing attends to
            logp_B += torch.where(finished_B, 0.0, token_logp_BV.gather(-1, token_B[:, None])[:, 0])
            token_B = torch.where(finished_B, pad, token_B)
            chosen.append(token_B)
            done_B = finished_B | (token_B == eos)
            ids_BT = torch.cat([ids_BT, token_B[:, None]], dim=1)
            attention_BT = torch.cat([attention_BT, (~finished_B).long()[:, None]], dim=1)
            if bool(done_B.all()):
                break
        tokens_BN = torch.stack(chosen, dim=1).tolist()
        for row, tokens in enumerate(tokens_BN):
            if eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            text = tokenizer.decode([t for t in tokens if t != pad], skip_special_tokens=True)
            results.append((text, float(np.exp(logp_B[row].item()))))
    return results


def exact_report(reference_logp: np.ndarray, greedy_confidence: Sequence[float], greedy_correct: Sequence[bool],
                 k_grid: Sequence[int]) -> dict[str, Any]:
    """pass@k from exact confidences plus the greedy-confidence summary, JSON-ready."""
    pass_at_k = coverage.exact_coverage_from_logp(np.minimum(reference_logp, 0.0), list(k_grid)).mean(0)
    return {
        "pass_at_k": {str(k): float(v) for k, v in zip(k_grid, pass_at_k)},
        "greedy": coverage.confidence_summary(greedy_confidence, greedy_correct).to_dict(),
    }
