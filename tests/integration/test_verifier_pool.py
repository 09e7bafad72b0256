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


def test_a_training_workers_answer_checker_starts_inside_a_sweeps_trial(tmp_path):
    """A training worker inside a Tune trial runs where Ray places the actors it starts in the
    worker's own placement group, which the worker fills: an answer checker asking Ray for CPUs
    there never started, and a CPU sweep of DCOa on a MATH-format task hung with no error. The
    checker is pinned to the worker's node (and a stall past its deadline would be an error)."""
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = tmp_path / "verdicts"

    # nested: Ray pickles them by value (the workers cannot import this test module)
    def _trainer_loop(config):
        from passn.config import load_config
        from trainer.sampler_client import answer_checker

        cfg = load_config(None, ["objective.kind=dcoa", "task.kind=math", "task.variant=cot", "task.answer_check=exact",
                                 "task.train_path=x.jsonl", "task.test_path=y.jsonl",
                                 "resources.sampler_unit_timeout_s=60"])
        checker = answer_checker(cfg)
        try:
            with open(config["out"], "w") as f:
                f.write(repr([v.correct for v in checker.check_many([("4", "4"), ("5", "4")])]))
        finally:
            checker.shutdown()

    def trial(config):
        TorchTrainer(_trainer_loop, train_loop_config={"out": str(out)}, torch_config=TorchConfig(backend="gloo"),
                     scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(storage_path=str(tmp_path / "train"))).fit()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tune.Tuner(tune.with_resources(trial, {"cpu": 0, "memory": 1 << 20}),  # as jobs/sweep.py asks
                   run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"))).fit()
    finally:
        ray.shutdown()
    assert out.read_text() == "[True, False]"
