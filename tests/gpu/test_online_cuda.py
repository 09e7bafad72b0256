"""DCOa on CUDA: a training worker and its transformers sampler actor sharing one GPU."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).parents[2]


def test_dcoa_steps_with_a_sampler_on_the_same_gpu(tmp_path):
    from jobs.train import run_training
    from passn.config import load_config

    cfg = load_config(str(ROOT / "configs" / "tiny-dcoa.yaml"), [
        # 96 references, 16 a step: the CE warm-up step, then up to 5 steps on the pool's samples
        "task.synthetic.num_train=96", "task.synthetic.num_test=16", "optim.epochs=1", "objective.ce_warmup_steps=1",
        "optim.sequences_per_step=16", "optim.micro_sequences_per_worker=16",
        "resources.num_workers=1", "resources.gpus_per_worker=0.5", "resources.cpus_per_worker=2",
        "resources.sampler_backend=transformers", "resources.sampler_gpu_fraction=0.5",
        "resources.sampler_check_every=1", "model.dtype=bfloat16", "evaluation.samples_per_problem=16",
        "evaluation.k_grid=[1,16]"])
    rows = run_training(cfg, str(tmp_path))
    assert [r["step"] for r in rows][:3] == [1, 2, 3], rows  # at least two steps draw, push and refill
    assert rows[0].get("sampled_tokens", 0) == 0 and all(r["sequences"] == 16 for r in rows)
    for row in rows[1:]:
        assert row["sampled_tokens"] > 0 and row["pool_version"] == row["step"] - 1
        assert row["sampler_gpu_peak_gb"] > 0 and row["gpu_peak_gb"] > 0
        # bf16 on both sides, the same weights: the greedy log-probs agree to bf16 precision
        assert row["sync_logp_gap"] < 0.05, row
