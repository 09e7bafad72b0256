"""Online training on CUDA: a training worker and its sampler actor sharing one GPU, with the
transformers engine and with CUDA vLLM (weights pushed in memory over CUDA IPC)."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).parents[2]
SHARED_GPU = ["task.synthetic.num_test=16", "optim.epochs=1", "objective.ce_warmup_steps=1",
              "optim.sequences_per_step=16", "optim.micro_sequences_per_worker=16",
              "resources.num_workers=1", "resources.gpus_per_worker=0.5", "resources.cpus_per_worker=2",
              "resources.sampler_gpu_fraction=0.4", "resources.sampler_check_every=1", "model.dtype=bfloat16",
              "evaluation.samples_per_problem=16", "evaluation.k_grid=[1,16]"]


@pytest.mark.parametrize(("config", "backend", "extra"), [
    # 96 references, 16 a step: the CE warm-up step, then up to 5 steps on the pool's samples
    ("tiny-dcoa.yaml", "transformers", ["task.synthetic.num_train=96"]),
    ("tiny-dcoa.yaml", "vllm", ["task.synthetic.num_train=96"]),
    # 8 prompts x 8 rollouts = 2 prompts a step of 16 sequences: 12 steps after the warm-up
    ("tiny-grpo.yaml", "vllm", ["task.synthetic.num_train=32", "objective.group_size=8"]),
], ids=["dcoa-transformers", "dcoa-vllm", "dr_grpo-vllm"])
def test_online_steps_with_a_sampler_on_the_same_gpu(tmp_path, config, backend, extra):
    from jobs.train import run_training
    from passn.config import load_config

    cfg = load_config(str(ROOT / "configs" / config), [*SHARED_GPU, *extra, f"resources.sampler_backend={backend}"])
    rows = run_training(cfg, str(tmp_path))
    assert [r["step"] for r in rows][:4] == [1, 2, 3, 4], rows  # the warm-up, then >= 3 steps that draw
    assert rows[0].get("sampled_tokens", 0) == 0 and all(r["sequences"] == 16 for r in rows)
    for row in rows[1:]:
        assert row["sampled_tokens"] > 0 and row["pool_version"] == row["step"] - 1
        assert row["gpu_peak_gb"] > 0
        if backend == "transformers":  # (vLLM's memory is its own allocator's, not torch's)
            assert row["sampler_gpu_peak_gb"] > 0
        # bf16 on both sides, the same weights: the pool's greedy log-prob is the trainer's
        assert row["sync_logp_gap"] < 1e-3 if backend == "vllm" else row["sync_logp_gap"] < 0.05, row
    # from step 3 on the pool got its weights pushed in memory, not a folder
    assert all(r["push_mb"] > 0 for r in rows[2:]), rows
