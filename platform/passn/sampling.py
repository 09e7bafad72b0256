"""What samplers return, and how prompts are split among them (pure; the engines live in actors/).

Shape legend: P = prompts, N = samples per prompt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled completion of one prompt.

    ``cumulative_logprob`` is sum_t log p(y_t | x, y_<t) over the generated tokens (the
    completion's log-confidence); ``num_tokens`` counts them.
    """

    prompt_index: int
    sample_index: int
    text: str
    token_ids: tuple[int, ...]
    cumulative_logprob: float
    num_tokens: int
    finish_reason: str
    policy_version: int = 0

    @property
    def confidence(self) -> float:
        return math.exp(self.cumulative_logprob)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A prompt that was not sampled, with the reason (for example, longer than the model allows)."""

    prompt_index: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Work:
    """A unit of sampling: some prompts, ``samples`` completions each, starting at ``first_sample``
    (large n is split into chunks; the seed of chunk c is ``seed + c``)."""

    prompt_indices: tuple[int, ...]
    first_sample: int
    samples: int
    chunk: int


SEED_SPACE = 1 << 62  # below torch's and vLLM's 64-bit limit, with room for seed + sample


def prompt_seed(seed: int, prompt_index: int, first_sample: int = 0) -> int:
    """The seed of sample ``first_sample`` of prompt ``prompt_index`` in a request seeded ``seed``.

    vLLM seeds the j-th of a request's n samples with ``seed + j``. So the samples of one prompt get
    the consecutive seeds base + s for s = 0 .. N-1 (chunks included), and different prompts or
    calls get unrelated bases: no two samples share a random stream. (``seed + chunk`` for every
    prompt, as before, made chunk c's sample j repeat chunk 0's sample j + c, and gave every prompt
    of a request the same random numbers.)"""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % SEED_SPACE + first_sample


def plan_work(num_prompts: int, samples_per_prompt: int, max_samples_per_request: int,
              prompts_per_unit: int) -> list[Work]:
    """Split P prompts x N samples into units of at most ``prompts_per_unit`` prompts and at most
    ``max_samples_per_request`` samples each: every (prompt, sample) pair lands in exactly one unit."""
    if samples_per_prompt < 1 or max_samples_per_request < 1 or prompts_per_unit < 1:
        raise ValueError("samples_per_prompt, max_samples_per_request and prompts_per_unit must be >= 1")
    units = []
    for chunk, first in enumerate(range(0, samples_per_prompt, max_samples_per_request)):
        samples = min(max_samples_per_request, samples_per_prompt - first)
        for start in range(0, num_prompts, prompts_per_unit):
            units.append(Work(tuple(range(start, min(start + prompts_per_unit, num_prompts))), first, samples, chunk))
    return units


def group_by_prompt(completions: Sequence[Completion], num_prompts: int) -> list[list[Completion]]:
    """Completions per prompt, in sample order."""
    out: list[list[Completion]] = [[] for _ in range(num_prompts)]
    for c in completions:
        out[c.prompt_index].append(c)
    for group in out:
        group.sort(key=lambda c: c.sample_index)
    return out


def kv_bytes_per_token(config: Any, width: int) -> int:
    """KV-cache bytes one token takes in an engine: keys and values of every layer's KV heads, of
    ``width`` bytes each (``config``: a Hugging Face model config)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * width


def one_sequence_kv_cache_bytes(kv_bytes_per_token: int, max_model_len: int) -> int:
    """The smallest KV cache a vLLM engine starts with: one sequence of ``max_model_len`` tokens
    and two blocks' rounding (a real model's context, 8192 tokens say, needs more than a default
    sized for short completions)."""
    return (max_model_len + 256) * kv_bytes_per_token


GPU_ENGINE_MARGIN_BYTES = 1 << 30  # activations, sampler buffers and CUDA graphs beside weights and cache


def engine_kv_cache_bytes(kv_bytes_per_token: int, max_model_len: int, max_num_seqs: int, share_bytes: int,
                          weight_bytes: int) -> int:
    """The KV cache a vLLM engine on a shared GPU is given (``kv_cache_memory_bytes``): room for
    its whole batch (``max_num_seqs`` sequences of ``max_model_len`` tokens, twice over for block
    rounding), at most what its share of the GPU (``share_bytes``) leaves after its weights and a
    margin. An error when the share cannot hold the weights, the margin and one sequence."""
    wanted = 2 * max_num_seqs * max_model_len * kv_bytes_per_token
    left = share_bytes - weight_bytes - GPU_ENGINE_MARGIN_BYTES
    one = 2 * max_model_len * kv_bytes_per_token
    if left < one:
        raise ValueError(f"a sampler's GPU share of {share_bytes / 2**30:.1f} GiB cannot hold its weights "
                         f"({weight_bytes / 2**30:.1f} GiB), a {GPU_ENGINE_MARGIN_BYTES >> 30} GiB margin and the KV "
                         "cache of one sequence: raise resources.sampler_gpu_fraction or set "
                         "resources.sampler_kv_cache_mb")
    return max(one, min(wanted, left))
