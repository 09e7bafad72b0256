"""Sampling with a Hugging Face causal LM and its KV cache: the transformers backend of the sampler
pool (for machines where vLLM cannot run) and the greedy max-confidence measurement.

    rows = sample_tokens(model, [[1, 5, 9], [1, 7]], samples=8, temperature=1.0, max_new_tokens=16,
                         seed=0, eos_ids={2}, pad_id=0)
    rows[p][s]  # Sampled(token_ids, cumulative_logprob, finish_reason) of prompt p, sample s

What makes it faster than calling ``model.generate`` per prompt:
- every prompt is prefilled once, then its KV cache is repeated for its ``samples`` rows;
- rows from many prompts share one decoding batch (up to ``max_rows``);
- finished rows leave the batch (their cache rows are dropped), so the batch shrinks as rows end;
- on a GPU, the host looks for finished rows every 8th step only (no sync per token).

Log-probabilities are the model's own (before temperature), accumulated in float64, as vLLM
reports them: ``cumulative_logprob`` = sum over generated tokens, <eos> included.

Shape legend: R = rows (prompt x sample), T = tokens, V = vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Sampled:
    token_ids: tuple[int, ...]  # generated tokens, the stopping <eos> included
    cumulative_logprob: float
    finish_reason: str  # "stop" (an end-of-sequence token) or "length"


def _group_sizes(num_prompts: int, samples: int, max_rows: int) -> list[int]:
    per_group = max(1, max_rows // samples)
    return [min(per_group, num_prompts - start) for start in range(0, num_prompts, per_group)]


@torch.inference_mode()
def sample_tokens(model, prompt_ids: Sequence[Sequence[int]], samples: int, temperature: float,
                  max_new_tokens: int, seed: int, eos_ids: Collection[int], pad_id: int,
                  max_rows: int = 512, sync_every: int | None = None) -> list[list[Sampled]]:
    """``samples`` completions of each prompt (temperature 0: greedy, ``samples`` must be 1).

    Finished rows leave the batch at a host sync every ``sync_every`` steps (default: every step on
    CPU, where a sync is free; every 8th on a GPU, so the host queues steps ahead of the device;
    rows past their <eos> decode a few extra tokens, which are dropped).
    Deterministic for a given (seed, prompts, samples, max_rows, sync_every) on a given device.
    """
    if samples < 1 or max_new_tokens < 1:
        raise ValueError("samples and max_new_tokens must be >= 1")
    if temperature < 0 or (temperature == 0 and samples != 1):
        raise ValueError("temperature must be >= 0, and greedy decoding (0) gives one sample per prompt")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    eos_R = torch.tensor(sorted(eos_ids), device=device, dtype=torch.long)
    sync_every = sync_every or (1 if device.type == "cpu" else 8)
    out: list[list[Sampled]] = []
    start = 0
    for size in _group_sizes(len(prompt_ids), samples, max_rows):
        out += _sample_group(model, prompt_ids[start : start + size], samples, temperature, max_new_tokens,
                             generator, eos_R, pad_id, device, sync_every)
        start += size
    return out


def _sample_group(model, prompt_ids, samples, temperature, max_new_tokens, generator, eos_R, pad_id, device,
                  sync_every):
    from transformers import DynamicCache

    width = max(len(ids) for ids in prompt_ids)
    lengths = torch.tensor([len(ids) for ids in prompt_ids], device=device)
    # left padding: every row's next token sits at the last position
    ids_PT = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in prompt_ids], device=device)
    attention_PT = (torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]).long()
    position_PT = (attention_PT.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits_PV = model(input_ids=ids_PT, attention_mask=attention_PT, position_ids=position_PT,
                      past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    if samples > 1:  # the prompt's cache is shared by its samples: prefill once, then repeat
        cache.batch_repeat_interleave(samples)
    logits_RV = logits_PV.repeat_interleave(samples, dim=0)
    attention_RT = attention_PT.repeat_interleave(samples, dim=0)
    position_R = position_PT[:, -1].repeat_interleave(samples, dim=0)

    num_rows = logits_RV.shape[0]
    row_of = torch.arange(num_rows, device=device)  # batch position -> original row
    live_R = torch.ones(num_rows, dtype=torch.bool, device=device)  # not yet past its <eos>
    steps: list[tuple[torch.Tensor, ...]] = []  # (rows, tokens, live) per step, kept on the device
    logp = torch.zeros(num_rows, dtype=torch.float64, device=device)
    stopped = torch.zeros(num_rows, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logp_RV = torch.log_softmax(logits_RV.double(), dim=-1)
        if temperature == 0:
            token_R = logp_RV.argmax(-1)
        else:
            probs_RV = torch.softmax(logits_RV.float() / temperature, dim=-1)
            token_R = torch.multinomial(probs_RV, 1, generator=generator)[:, 0]
        logp.index_add_(0, row_of, torch.where(live_R, logp_RV.gather(-1, token_R[:, None])[:, 0], 0.0))
        steps.append((row_of, token_R, live_R))
        stopped_R = torch.isin(token_R, eos_R) & live_R
        stopped[row_of] |= stopped_R
        live_R = live_R & ~stopped_R
        if step == max_new_tokens - 1:
            break
        if (step + 1) % sync_every == 0 and not bool(live_R.all()):
            keep_R = live_R.nonzero()[:, 0]
            if keep_R.numel() == 0:
                break
            cache.batch_select_indices(keep_R)
            row_of, token_R, live_R = row_of[keep_R], token_R[keep_R], live_R[keep_R]
            attention_RT, position_R = attention_RT[keep_R], position_R[keep_R]
        attention_RT = torch.cat([attention_RT, attention_RT.new_ones(len(row_of), 1)], dim=1)
        position_R = position_R + 1
        logits_RV = model(input_ids=token_R[:, None], attention_mask=attention_RT, position_ids=position_R[:, None],
                          past_key_values=cache, use_cache=True).logits[:, -1]
    # one transfer at the end: tokens grouped by row, in step order (a stable sort keeps the order)
    live = torch.cat([lv for _, _, lv in steps])
    all_rows = torch.cat([r for r, _, _ in steps])[live].cpu().numpy()
    all_tokens = torch.cat([t for _, t, _ in steps])[live].cpu().numpy()
    order = np.argsort(all_rows, kind="stable")
    per_row = np.split(all_tokens[order], np.cumsum(np.bincount(all_rows, minlength=num_rows))[:-1])
    logp_list, stopped_list = logp.tolist(), stopped.tolist()
    rows = [Sampled(tuple(int(t) for t in per_row[r]), logp_list[r], "stop" if stopped_list[r] else "length")
            for r in range(num_rows)]
    return [rows[p * samples : (p + 1) * samples] for p in range(len(prompt_ids))]
