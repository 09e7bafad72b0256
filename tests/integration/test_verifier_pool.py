"""VerifierPool: bounded answer checks on Ray actors with one shared cache."""

import time

import pytest
import ray

from actors.verifier import VerifierPool

pytestmark = pytest.mark.integration


def test_verifier_pool_checks_in_parallel_with_a_shared_cache():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pool = VerifierPool(num_actors=2, timeout_s=1.0)
        pairs = [(r"\frac{1}{2}", "0.5")] * 100 + [("2x+x^2", "x^2+2x"), ("3", "4"), (None, "1"),
                                                   ("9^{9^{9^{9}}}", "3")]
        start = time.monotonic()
        verdicts = pool.check_many(pairs)
        assert [v.correct for v in verdicts] == [True] * 101 + [False] * 3
        assert verdicts[-2].reason == "empty"
        assert len(pool.cache) == 5  # 104 pairs, 5 distinct
        assert time.monotonic() - start < 60
        again = pool.check_many([("x^2+2x", "2x+x^2"), (r"\frac{1}{2}", "0.5")])
        assert [v.correct for v in again] == [True, True] and len(pool.cache) == 6
        pool.shutdown()
    finally:
        ray.shutdown()
