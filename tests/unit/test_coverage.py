"""passn.coverage: unbiased pass@k, exact coverage, confidence summaries, frontier, bounds."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from passn import coverage as cov


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the C(n, k) subsets of k samples that hold at least one of the c correct ones."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_hand_values():
    assert cov.pass_at_k(2, 1, 1) == pytest.approx(0.5)  # one of two samples correct
    assert cov.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert cov.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert cov.pass_at_k(10, 0, 5) == 0.0
    assert cov.pass_at_k(4096, 1, 1) == pytest.approx(1 / 4096, rel=1e-12)
    # 1 - C(4095, 2) / C(4096, 2) = 1 - 4094/4096 = 2/4096
    assert cov.pass_at_k(4096, 1, 2) == pytest.approx(2 / 4096, rel=1e-10)


@given(data=st.data())
def test_pass_at_k_equals_subset_enumeration(data):
    n = data.draw(st.integers(1, 10))
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    assert cov.pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


@given(n=st.integers(1, 5000), data=st.data())
def test_pass_at_k_is_one_when_fewer_than_k_wrong(n, data):
    k = data.draw(st.integers(1, n))
    c = data.draw(st.integers(max(n - k + 1, 0), n))
    assert cov.pass_at_k(n, c, k) == 1.0


def test_pass_at_k_broadcasts_over_problems_and_grid():
    n = np.array([8, 8, 8])
    c = np.array([0, 1, 8])
    got = cov.pass_at_k(n, c, [1, 2, 8])
    assert got.shape == (3, 3)
    # problem 1: c = 1 of 8 -> k/8 for every k; problem 2 always 1
    np.testing.assert_allclose(got[1], [1 / 8, 2 / 8, 1.0])
    np.testing.assert_array_equal(got[0], 0.0)
    np.testing.assert_array_equal(got[2], 1.0)
    assert cov.pass_at_k(8, c, 2).shape == (3,)


def test_pass_at_k_matches_a_python_loop_on_a_large_grid():
    rng = np.random.default_rng(0)
    n = np.full(50, 4096)
    c = rng.integers(0, 4097, size=50)
    ks = 2 ** np.arange(13)
    got = cov.pass_at_k(n, c, ks)
    for p in range(50):
        for j, k in enumerate(ks):
            want = 1.0 if n[p] - c[p] < k else 1.0 - math.prod(1.0 - k / i for i in range(n[p] - c[p] + 1, n[p] + 1))
            assert got[p, j] == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_pass_at_k_validates_inputs():
    with pytest.raises(ValueError, match="exceeds"):
        cov.pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="num_correct"):
        cov.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="positive"):
        cov.pass_at_k(4, 1, 0)


def test_chunked_estimator_hand_example():
    # samples (in order) F T F F | F F F F -> chunks of 4: [hit, miss] -> 0.5; k = 8: one chunk, hit
    correct = np.array([[0, 1, 0, 0, 0, 0, 0, 0]], dtype=bool)
    np.testing.assert_allclose(cov.pass_at_k_chunked(correct, [4, 8]), [[0.5, 1.0]])
    # k = 1 is the plain mean: 1/8
    assert cov.pass_at_k_chunked(correct, 1)[0] == pytest.approx(1 / 8)


def test_chunked_and_unbiased_agree_in_expectation():
    rng = np.random.default_rng(1)
    correct = rng.random((4000, 16)) < 0.1
    chunked = cov.pass_at_k_chunked(correct, 4).mean()
    unbiased = cov.pass_at_k(16, correct.sum(1), 4).mean()
    # exact: 1 - 0.9^4 = 0.3439
    assert chunked == pytest.approx(0.3439, abs=0.02)
    assert unbiased == pytest.approx(0.3439, abs=0.01)


def test_exact_coverage():
    # p = 0.5: 1 - 0.5^N
    np.testing.assert_allclose(cov.exact_coverage([0.5], [1, 2, 3]), [[0.5, 0.75, 0.875]])
    np.testing.assert_allclose(cov.exact_coverage([0.0, 1.0], 4), [0.0, 1.0])
    got = cov.exact_coverage_from_logp(np.log([1e-300, 0.5, 1 - 1e-15]), [1, 65536])
    np.testing.assert_allclose(got[1], [0.5, 1.0])
    assert got[0, 1] == pytest.approx(65536e-300, rel=1e-9)


def test_exact_coverage_matches_sampling():
    rng = np.random.default_rng(2)
    p = rng.random(300) * 0.2
    draws = rng.random((300, 64)) < p[:, None]
    sampled = cov.pass_at_k(64, draws.sum(1), 16).mean()
    assert sampled == pytest.approx(cov.exact_coverage(p, 16).mean(), abs=0.03)


def test_confidence_summary_hand_example():
    conf = [0.05, 0.15, 0.95, 0.97, 1.0]
    correct = [False, True, True, False, True]
    s = cov.confidence_summary(conf, correct, num_bins=10)
    assert s.count_correct == [0, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert s.count_incorrect == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert s.fraction_correct[9] == pytest.approx(2 / 3)
    assert s.fraction_correct[5] is None
    assert s.mean_confidence == pytest.approx((0.05 + 0.15 + 0.95 + 0.97 + 1.0) / 5)
    assert s.accuracy == pytest.approx(3 / 5)
    # three above 0.9, one of them wrong: 3/5 high, 1/5 high and wrong
    assert s.fraction_high_confidence == pytest.approx(3 / 5)
    assert s.fraction_high_confidence_wrong == pytest.approx(1 / 5)
    assert s.to_dict()["bin_edges"][-1] == 1.0


def test_pareto_frontier_hand_example():
    rows = [
        {"trial": "ce", "k": 1, "pass_at_k": 0.35, "budget": 1},
        {"trial": "ce", "k": 256, "pass_at_k": 0.68, "budget": 1},
        {"trial": "dco64", "k": 1, "pass_at_k": 0.20, "budget": 64},
        {"trial": "dco64", "k": 256, "pass_at_k": 0.95, "budget": 64},
        {"trial": "dco256", "k": 256, "pass_at_k": 0.95, "budget": 256},  # a tie: first row wins
    ]
    assert cov.pareto_frontier(rows) == [
        {"N": 1, "pass_at_N": 0.35, "trial": "ce", "budget": 1},
        {"N": 256, "pass_at_N": 0.95, "trial": "dco64", "budget": 64},
    ]


def test_max_confidence_bounds_hand_values():
    # N = 2, q = (0.6, 0.3): upper 1 / (1 + 0.5) = 2/3; lower 1 - 0.4/0.6 = 1/3
    lower, upper = cov.max_confidence_bounds(0.6, 0.3, 2)
    assert (lower, upper) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert cov.max_confidence_bounds(0.6, 0.3, 1) == (1.0, 1.0)


@given(q1=st.floats(0.3, 0.95), ratio=st.floats(0.05, 1.0), n=st.integers(2, 64))
def test_max_confidence_bounds_contain_the_optimum(q1, ratio, n):
    # Three candidate answers, correct with probabilities q1 >= q2 >= q3 (mutually exclusive).
    q2 = min(q1 * ratio, 1 - q1)
    q3 = max(0.0, min(q2, 1 - q1 - q2))
    q = np.array([q1, q2, q3])
    # Maximise pass@N = sum_j q_j (1 - (1 - pi_j)^N) over the simplex on a fine grid.
    grid = np.linspace(0, 1, 401)
    a, b = np.meshgrid(grid, grid, indexing="ij")
    ok = a + b <= 1
    pi = np.stack([a[ok], b[ok], 1 - a[ok] - b[ok]], axis=-1)
    value = (q * (1 - (1 - pi) ** n)).sum(-1)
    best = pi[np.argmax(value)].max()
    lower, upper = cov.max_confidence_bounds(q1, q2, n)
    assert lower - 0.01 <= best <= upper + 0.01
