"""pass@k and coverage: the metrics passn optimises and reports (numpy).

- :func:`pass_at_k`: the unbiased estimator from n samples with c verified correct
  (Chen et al. 2021), vectorised over problems and a k grid.
- :func:`pass_at_k_chunked`: the paper's disjoint-chunk estimator (compatibility mode only).
- :func:`exact_coverage`: 1 - (1 - p)^N from a model's confidence (paper Eq. 2).
- :func:`confidence_summary`: greedy/max-confidence histograms and calibration (Section 4.3).
- :func:`pareto_frontier`: the best trial for each test budget N (Figure 2a).
- :func:`max_confidence_bounds`: derived bounds on the pass@N-optimal max confidence.

Shape legend: P = problems, K = values of k (or N), S = samples per problem.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


def _k_grid(k: int | Sequence[int] | np.ndarray) -> np.ndarray:
    k_K = np.asarray(k, dtype=np.int64)
    if k_K.ndim > 1 or (k_K < 1).any():
        raise ValueError(f"k must be a positive integer or a 1-D grid of them, got {k!r}")
    return k_K


def pass_at_k(
    num_samples: int | Sequence[int] | np.ndarray,
    num_correct: int | Sequence[int] | np.ndarray,
    k: int | Sequence[int] | np.ndarray,
) -> np.ndarray:
    """Unbiased pass@k per problem: 1 - C(n - c, k) / C(n, k) (MATH.md section 1).

    ``num_samples`` (n) and ``num_correct`` (c) broadcast to the problems' shape; ``k`` is a
    scalar or a 1-D grid. The result has shape ``problems_shape + k_shape``; average it over
    problems for the data set's pass@k. Exactly 1 when n - c < k. Computed as
    ``1 - exp(sum_{i=n-c+1}^{n} log1p(-k / i))`` from one cumulative table per k, so a grid of
    500 problems x 13 values of k at n = 4096 costs one pass over 13 x 4096 numbers.
    """
    n_P, c_P = np.broadcast_arrays(np.asarray(num_samples, np.int64), np.asarray(num_correct, np.int64))
    k_K = _k_grid(k)
    if (c_P < 0).any() or (c_P > n_P).any():
        raise ValueError("num_correct must lie in [0, num_samples] for every problem")
    if n_P.size and k_K.size and k_K.max() > n_P.min():
        raise ValueError(f"k = {int(k_K.max())} exceeds the smallest sample count n = {int(n_P.min())}")
    if n_P.size == 0 or k_K.size == 0:
        return np.zeros(n_P.shape + k_K.shape)

    k_flat = k_K.reshape(-1)
    # log_tail[j, m] = sum_{i=k_j+1}^{m} log(1 - k_j / i) for m >= k_j (zero below): then
    # log(C(n-c, k) / C(n, k)) = log_tail[n] - log_tail[n - c] whenever n - c >= k.
    max_n = int(n_P.max())
    i = np.arange(1, max_n + 1, dtype=np.float64)
    terms = np.log1p(-np.minimum(k_flat[:, None] / i[None, :], 1.0), where=i[None, :] > k_flat[:, None],
                     out=np.zeros((k_flat.size, max_n)))
    log_tail = np.concatenate([np.zeros((k_flat.size, 1)), np.cumsum(terms, axis=1)], axis=1)

    n_flat, c_flat = n_P.reshape(-1), c_P.reshape(-1)
    log_miss = log_tail[:, n_flat] - log_tail[:, n_flat - c_flat]  # [K, P]
    hit_KP = 0.0 - np.expm1(log_miss)  # not -expm1: that gives -0.0 for problems never solved
    hit_KP[(n_flat - c_flat)[None, :] < k_flat[:, None]] = 1.0
    return hit_KP.T.reshape(n_P.shape + k_K.shape)


def pass_at_k_chunked(correct_PS: np.ndarray, k: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """The paper's notebook estimator: split the S samples of each problem into floor(S / k)
    disjoint chunks of k in their drawn order and average the hit rate (MATH.md section 1).

    Same expectation as :func:`pass_at_k`, higher variance; offered only to compare with the
    paper's numbers. Returns shape [P, K] (or [P] for scalar k).
    """
    correct_PS = np.asarray(correct_PS, dtype=bool)
    if correct_PS.ndim != 2:
        raise ValueError("correct_PS must be a [problems, samples] boolean array")
    k_K = _k_grid(k)
    num_samples = correct_PS.shape[1]
    out = []
    for kk in k_K.reshape(-1):
        chunks = num_samples // int(kk)
        if chunks == 0:
            raise ValueError(f"k = {int(kk)} exceeds the sample count {num_samples}")
        hits = correct_PS[:, : chunks * kk].reshape(correct_PS.shape[0], chunks, kk).any(-1)
        out.append(hits.mean(-1))
    return np.stack(out, axis=-1).reshape(correct_PS.shape[:1] + k_K.shape)


def exact_coverage(confidence: np.ndarray | Sequence[float], budget: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """coverage_N(p) = 1 - (1 - p)^N per problem (paper Eq. 2), computed as -expm1(N log1p(-p)).

    Returns shape ``confidence.shape + budget.shape``; the mean over problems is C_N.
    """
    p = np.asarray(confidence, dtype=np.float64)
    n_K = _k_grid(budget)
    if ((p < 0) | (p > 1) | np.isnan(p)).any():
        raise ValueError("confidence must lie in [0, 1]")
    with np.errstate(divide="ignore"):
        log_q = np.log1p(-p)
    return -np.expm1(log_q[..., None] * n_K.reshape(-1)).reshape(p.shape + n_K.shape)


def exact_coverage_from_logp(logp: np.ndarray | Sequence[float], budget: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """:func:`exact_coverage` from log-confidences s = log p (exact when p is within 1e-16 of 1)."""
    s = np.asarray(logp, dtype=np.float64)
    if (s > 0).any() or np.isnan(s).any():
        raise ValueError("log-confidence must be <= 0")
    n_K = _k_grid(budget)
    with np.errstate(divide="ignore"):
        log_q = np.where(s > -np.log(2.0), np.log(-np.expm1(s)), np.log1p(-np.exp(s)))
    return -np.expm1(log_q[..., None] * n_K.reshape(-1)).reshape(s.shape + n_K.shape)


@dataclasses.dataclass(frozen=True)
class ConfidenceSummary:
    """Greedy (max-)confidence over a test set, split by correctness (Section 4.3, Figure 1).

    ``fraction_correct[b]`` is the calibration curve: the share of correct answers among problems
    whose confidence falls in bin b (None where the bin is empty).
    """

    bin_edges: list[float]
    count_correct: list[int]
    count_incorrect: list[int]
    fraction_correct: list[float | None]
    mean_confidence: float
    accuracy: float
    high_confidence_threshold: float
    fraction_high_confidence: float
    fraction_high_confidence_wrong: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def confidence_summary(
    confidence: np.ndarray | Sequence[float],
    correct: np.ndarray | Sequence[bool],
    num_bins: int = 10,
    high_confidence_threshold: float = 0.9,
) -> ConfidenceSummary:
    """Histogram of confidences split by correctness, calibration per bin, overconfidence share.

    ``fraction_high_confidence_wrong`` is the share of *all* problems answered with confidence
    above the threshold and wrong: the paper's overconfidence.
    """
    p = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct, dtype=bool).reshape(-1)
    if p.shape != ok.shape:
        raise ValueError(f"confidence and correct differ in length: {p.size} vs {ok.size}")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("confidence must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bin_of = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, num_bins - 1)
    n_ok = np.bincount(bin_of[ok], minlength=num_bins)
    n_bad = np.bincount(bin_of[~ok], minlength=num_bins)
    totals = n_ok + n_bad
    high = p > high_confidence_threshold
    size = max(p.size, 1)
    return ConfidenceSummary(
        bin_edges=edges.tolist(),
        count_correct=n_ok.tolist(),
        count_incorrect=n_bad.tolist(),
        fraction_correct=[float(a / t) if t else None for a, t in zip(n_ok, totals)],
        mean_confidence=float(p.mean()) if p.size else 0.0,
        accuracy=float(ok.mean()) if ok.size else 0.0,
        high_confidence_threshold=high_confidence_threshold,
        fraction_high_confidence=float(high.sum() / size),
        fraction_high_confidence_wrong=float((high & ~ok).sum() / size),
    )


def pareto_frontier(rows: Sequence[dict[str, Any]], value_key: str = "pass_at_k", budget_key: str = "k",
                    trial_key: str = "trial") -> list[dict[str, Any]]:
    """For each test budget N, the row of the trial with the highest pass@N (Figure 2a).

    ``rows`` are result records holding at least ``budget_key``, ``value_key`` and ``trial_key``;
    ties go to the first row in input order. Returns one row per N, sorted by N, with keys
    ``N``, ``pass_at_N`` and ``trial`` plus the rest of the winning record.
    """
    best: dict[int, dict[str, Any]] = {}
    for row in rows:
        n = int(row[budget_key])
        if n not in best or row[value_key] > best[n][value_key]:
            best[n] = row
    frontier = []
    for n in sorted(best):
        row = dict(best[n])
        value, trial = row.pop(value_key), row.pop(trial_key)
        row.pop(budget_key)
        frontier.append({"N": n, "pass_at_N": float(value), "trial": trial, **row})
    return frontier


def max_confidence_bounds(q_best: float, q_second: float, budget: int) -> tuple[float, float]:
    """Bounds on the max confidence of the pass@N-optimal policy. DERIVED, not the paper's formula.

    One problem whose candidate answers are correct with calibrated probabilities
    q_1 >= q_2 >= ...; pass@N = sum_j q_j (1 - (1 - pi_j)^N) is concave in the policy pi, and the
    KKT conditions give (MATH.md section 5, with the same content as the paper's Lemmas 4.2/4.3):

        upper:  pi_max <= 1 / (1 + (q_2 / q_1)^(1 / (N - 1)))
        lower:  pi_max >= 1 - ((1 - q_1) / q_1)^(1 / (N - 1))   (clipped to [0, 1])

    Both fall as N grows: explore at large N, exploit at small N. N = 1 gives (1, 1).
    Returns (lower, upper).
    """
    if not 0 < q_best <= 1 or not 0 <= q_second <= q_best or q_best + q_second > 1 + 1e-12:
        raise ValueError("need 0 < q_best <= 1, 0 <= q_second <= q_best and q_best + q_second <= 1 "
                         "(at most one answer is correct)")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if budget == 1:
        return 1.0, 1.0
    exponent = 1.0 / (budget - 1)
    upper = 1.0 / (1.0 + (q_second / q_best) ** exponent)
    lower = 1.0 - ((1.0 - q_best) / q_best) ** exponent
    return float(max(lower, 0.0)), float(upper)
