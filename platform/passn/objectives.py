"""Training objectives for pass@N: CE, DCO, DCOstep, whole-proof DCO, DCOa and Dr. GRPO.

Every one of them trains as :func:`weighted_ce_loss`, CE times a detached per-sequence
coefficient; this module holds that loss and the coefficients (the coverage weight F(N', p), its
Monte Carlo form for DCOa, Dr. GRPO's advantages), as pure torch functions. Which coefficient a
sequence gets is decided by its batch source (``passn.batches``). Paper: "Rethinking Fine-Tuning when Scaling Test-Time Compute: Limiting Confidence
Improves Mathematical Reasoning" (arXiv 2502.07154, NeurIPS 2025). Equations as restated in
docs/MATH.md.

Shape legend: B = sequences (or proof steps), T = tokens, V = vocabulary, P = prompts,
G = rollouts per prompt.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

CeNormalisation = Literal["sequence_sum", "token_mean"]

# Below this log-confidence p < 2e-22, so N p < 2e-17 for every budget we allow and
# F(N, p) = 1 - (N - 1) p / 2 + O((N p)^2) equals 1 in float64.
_TINY_LOGP = -50.0
MAX_BUDGET = 1 << 20


def _check_budget(budget: int | float | torch.Tensor) -> None:
    if isinstance(budget, torch.Tensor):
        bad = bool((budget < 1).any()) or bool((budget > MAX_BUDGET).any())
    else:
        bad = not 1 <= budget <= MAX_BUDGET
    if bad:
        raise ValueError(f"budget N must be in [1, {MAX_BUDGET}], got {budget}")


def _as_float64(x: float | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64)
    return torch.as_tensor(x, dtype=torch.float64)


def log1mexp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(s)) for s <= 0, accurate at both ends (Maechler 2012).

    Near s = 0 (p near 1) ``log(-expm1(s))`` keeps the digits ``log1p(-exp(s))`` loses, and the
    reverse holds for very negative s.
    """
    # Each branch sees only inputs from its own side, so the unused one never makes inf * 0 = nan
    # in the backward pass.
    cut = -math.log(2.0)
    return torch.where(
        logp > cut,
        torch.log(-torch.expm1(logp.clamp(min=cut))),
        torch.log1p(-torch.exp(logp.clamp(max=cut))),
    )


def coverage_weight(budget: int | float | torch.Tensor, confidence: float | torch.Tensor) -> torch.Tensor:
    """Coverage weight F(N, p) of the DCO gradient (paper Eq. 4; MATH.md section 2).

        F(N, p) = N p (1 - p)^(N - 1) / (1 - (1 - p)^N),   grad l_DCO^N = F(N, p) grad l_CE

    Evaluated in float64 as ``N p exp((N - 1) L) / -expm1(N L)`` with ``L = log1p(-p)``.
    F(1, p) = 1; F(N, 0) = 1; F(N, 1) = 0 for N > 1; F is strictly decreasing in p.
    Returns a detached float64 tensor broadcast over ``budget`` and ``confidence``.
    """
    _check_budget(budget)
    p = _as_float64(confidence)
    if bool(((p < 0) | (p > 1) | torch.isnan(p)).any()):
        raise ValueError("confidence p must lie in [0, 1]")
    n = _as_float64(budget).to(p.device)
    n, p = torch.broadcast_tensors(n, p)
    log_q = torch.log1p(-p)
    return _weight_from_log_q(n, p, log_q, small=p < math.exp(_TINY_LOGP))


def coverage_weight_from_logp(budget: int | float | torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """F(N, p) = N p (1 - p)^(N - 1) / (1 - (1 - p)^N) from s = log p (paper Eq. 4; see
    :func:`coverage_weight`).

    Preferred inside training: models give s directly, and 1 - p is taken as exp(log1mexp(s)),
    which stays exact when p is within 1e-16 of 1.
    """
    _check_budget(budget)
    s = _as_float64(logp)
    invalid = ((s > 0) | torch.isnan(s)).any()
    if s.is_cuda:  # checked on the device: a host sync here would stall every training step
        torch._assert_async(~invalid, "log-confidence must be <= 0")
    elif bool(invalid):
        raise ValueError("log-confidence must be <= 0")
    n = _as_float64(budget).to(s.device)
    n, s = torch.broadcast_tensors(n, s)
    return _weight_from_log_q(n, torch.exp(s), log1mexp(s), small=s < _TINY_LOGP)


def _weight_from_log_q(n: torch.Tensor, p: torch.Tensor, log_q: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    # (N - 1) * L is 0 * -inf = nan at N = 1, p = 1; F(1, p) = 1 everywhere, so mask it.
    exponent = torch.where(n == 1, torch.zeros_like(log_q), (n - 1) * log_q)
    numerator = n * p * torch.exp(exponent)
    denominator = -torch.expm1(n * log_q)
    safe = ~small & (denominator > 0)
    weight = numerator / torch.where(safe, denominator, torch.ones_like(denominator))
    weight = torch.where(safe, weight, torch.ones_like(weight))
    return torch.where(n == 1, torch.ones_like(weight), weight.clamp(0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------------------------


def token_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """log p(y_t | x, y_<t) = logit[y_t] - logsumexp(logits) per target token (paper Eq. 1), in
    float32 (or float64 if the logits are).

    ``logits_BTV[:, t]`` must score ``targets_BT[:, t]`` (shift before calling:
    Hugging Face causal LMs give ``logits[:, :-1]`` for ``input_ids[:, 1:]``). bf16 logits are
    upcast first: confidences built from bf16 log-probs are off by percents.
    """
    logits = logits_BTV if logits_BTV.dtype == torch.float64 else logits_BTV.float()
    target_logits_BT = logits.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)
    return target_logits_BT - torch.logsumexp(logits, dim=-1)


def sequence_logprob(token_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """s = log p(y | x) = sum_t mask_t log p(y_t | x, y_<t): the log of the confidence p that
    enters Eq. 2-4 (paper Section 4; MATH.md notation)."""
    return (token_logp_BT * mask_BT.to(token_logp_BT.dtype)).sum(-1)


def ce_loss(
    token_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    normalisation: CeNormalisation = "sequence_sum",
) -> torch.Tensor:
    """Per-sequence cross-entropy l_CE = -log p(y | x) (paper Eq. 1).

    ``sequence_sum`` is Eq. 4's -sum_t log p(y_t | ...); ``token_mean`` divides each sequence by its
    token count, as the paper's released code did. Returns shape [B].
    """
    mask = mask_BT.to(token_logp_BT.dtype)
    nll_B = -(token_logp_BT * mask).sum(-1)
    if normalisation == "sequence_sum":
        return nll_B
    if normalisation == "token_mean":
        return nll_B / mask.sum(-1).clamp(min=1.0)
    raise ValueError(f"CE normalisation must be 'sequence_sum' or 'token_mean', got {normalisation!r}")


def weighted_ce_loss(
    token_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    weight_B: torch.Tensor,
    normalisation: CeNormalisation = "sequence_sum",
) -> torch.Tensor:
    """w * l_CE per sequence with w detached, the form of every DCO variant's gradient
    ``grad l = F grad l_CE`` (paper Eq. 4). Shape [B].

    Detached: the weight is a coefficient of the CE gradient, not a path for gradients.
    """
    ce_B = ce_loss(token_logp_BT, mask_BT, normalisation)
    return weight_B.detach().to(ce_B.dtype) * ce_B


# ---------------------------------------------------------------------------------------------
# DCO (Section 4.4, Eq. 3-4) and its step-wise and whole-proof forms (Section 5.3)
# ---------------------------------------------------------------------------------------------


def dco_weights(seq_logp_B: torch.Tensor, budget: int | float | torch.Tensor) -> torch.Tensor:
    """F(N', p) per sequence from log-confidences, float64 and detached (paper Eq. 4; MATH.md 2)."""
    return coverage_weight_from_logp(budget, seq_logp_B.detach())


# ---------------------------------------------------------------------------------------------
# DCOa (Section 5.4)
# ---------------------------------------------------------------------------------------------


def monte_carlo_confidence(num_correct: torch.Tensor, num_samples: int | torch.Tensor) -> torch.Tensor:
    """p_MC = correct / k: the share of k sampled chains of thought whose final answer verifies,
    the Monte Carlo estimate of p(y | x) = sum_c p(c, y | x) (paper Section 5.4; MATH.md section 4)."""
    num_correct = _as_float64(num_correct)
    k = _as_float64(num_samples).to(num_correct.device)
    if bool((k < 1).any()) or bool(((num_correct < 0) | (num_correct > k)).any()):
        raise ValueError("need 0 <= num_correct <= num_samples and num_samples >= 1")
    return num_correct / k


def dcoa_weights(num_correct: torch.Tensor, num_samples: int | torch.Tensor, budget: int | float) -> torch.Tensor:
    """F(N', p_MC), the DCOa weight (paper Section 5.4; MATH.md section 4)."""
    return coverage_weight(budget, monte_carlo_confidence(num_correct, num_samples))


# ---------------------------------------------------------------------------------------------
# Dr. GRPO baseline (Appendix B)
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards_PG: torch.Tensor) -> torch.Tensor:
    """A_i = R_i - mean_j R_j within each prompt's group of G rollouts, no division by the std
    (Dr. GRPO; paper Appendix B, MATH.md section 6)."""
    rewards = rewards_PG.to(torch.float64)
    return rewards - rewards.mean(dim=-1, keepdim=True)


def balanced_groups(rewards_PG: torch.Tensor) -> torch.Tensor:
    """Batch balancing: True for prompts whose G rewards are not all equal; all 0 or all 1 give
    A_i = 0 for every rollout, no gradient signal, and are skipped (paper Appendix B)."""
    return rewards_PG.amax(dim=-1) != rewards_PG.amin(dim=-1)
