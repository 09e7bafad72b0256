"""Online training on CUDA: a training worker and its sampler actor sharing one GPU, with the
transformers engine and with CUDA vLLM (weights pushed in memory over CUDA IPC; asleep between
draws at staleness 0).

The policy starts from a short CE run on the same task (as tests/integration/test_online_training.py
does on the CPU), so that p_MC and the rollouts' rewards spread: DCOa drops and refills candidates,
and Dr. GRPO meets groups whose rewards differ (a random policy earns none, and every group of equal
rewards is skipped)."""

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).parents[2]
# the synthetic task's rule depends on its sizes: every run here uses the same ones
TASK = ["task.synthetic.num_train=160", "task.synthetic.num_test=16"]
ONE_GPU = ["resources.num_workers=1", "resources.gpus_per_worker=0.5", "resources.cpus_per_worker=2",
           "model.dtype=bfloat16", "optim.sequences_per_step=16", "optim.micro_sequences_per_worker=16",
           "evaluation.samples_per_problem=16", "evaluation.k_grid=[1,16]"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """The tiny model after 6 CE epochs (60 steps) on the task: its Hugging Face folder."""
    from jobs.train import run_training
    from passn.config import load_config

    run_dir = tmp_path_factory.mktemp("ce")
    cfg = load_config(str(ROOT / "configs" / "tiny-dcoa.yaml"),
                      ["objective.kind=ce", "optim.epochs=6", "evaluation.every_epochs=6", *TASK, *ONE_GPU])
    run_training(cfg, str(run_dir))
    (last,) = sorted((run_dir / "checkpoints").iterdir())[-1:]
    return str(last / "model")


@pytest.mark.parametrize(("config", "backend", "extra"), [
    # 160 references, 16 a step: the CE warm-up step, then steps on the pool's samples (drops refilled)
    ("tiny-dcoa.yaml", "transformers", []),
    # its evaluation sampled by the same CUDA vLLM engine, given the last step's weights
    ("tiny-dcoa.yaml", "vllm", ["evaluation.sampler=pool"]),
    # 8 rollouts of 2 prompts a step
    ("tiny-grpo.yaml", "vllm", ["objective.group_size=8"]),
    # ZeRO-3: each weight gathered alone into the push; staleness 1: the draw beside training, no sleep
    ("tiny-dcoa.yaml", "vllm", ["resources.zero_stage=3", "objective.staleness=1"]),
    # float32 on both sides: the push's exactness without bf16's rounding of the logits
    ("tiny-dcoa.yaml", "vllm", ["model.dtype=float32"]),
], ids=["dcoa-transformers", "dcoa-vllm", "dr_grpo-vllm",
        "dcoa-vllm-zero3-staleness1", "dcoa-vllm-float32"])
def test_online_steps_with_a_sampler_on_the_same_gpu(pretrained, tmp_path, config, backend, extra):
    from jobs.train import run_training
    from passn.config import load_config

    dcoa = config == "tiny-dcoa.yaml"
    cfg = load_config(str(ROOT / "configs" / config), [
        "model.tiny=null", f"model.path={pretrained}", *TASK, *ONE_GPU, "optim.epochs=1",
        "objective.ce_warmup_steps=1", "resources.sampler_gpu_fraction=0.4", "resources.sampler_check_every=1",
        f"resources.sampler_backend={backend}",
        # DCOa: N' = 16, k = 32, as on the CPU: candidates from p_MC ~0.35 up are dropped and refilled
        *(["objective.budget=16", "objective.mc_samples=32"] if dcoa else []), *extra])
    rows = run_training(cfg, str(tmp_path))
    gaps = [r.get("sync_logp_gap") for r in rows[1:]]
    per_token = [r.get("sync_logp_gap_per_token") for r in rows[1:]]
    print(f"{config} {backend} {extra}: sync_logp_gap per step {json.dumps(gaps)}, per token {json.dumps(per_token)}; "
          f"dropped {[r['dropped'] for r in rows]}; push_mb {rows[-1].get('push_mb')}, "
          f"sync_s {[round(r.get('sync_s', 0), 4) for r in rows]}")
    assert [r["step"] for r in rows][:4] == [1, 2, 3, 4], rows  # the warm-up, then >= 3 steps that draw
    assert rows[0].get("sampled_tokens", 0) == 0 and all(r["sequences"] == 16 for r in rows)
    for row in rows[1:]:
        assert row["sampled_tokens"] > 0
        # the pool holds the trainer's weights (staleness 1: its draw may be a version behind them)
        assert row["step"] - 1 - cfg.objective.staleness <= row["pool_version"] <= row["step"] - 1, row
        assert row["gpu_peak_gb"] > 0
        if backend == "transformers":  # (vLLM's memory is its own allocator's, not torch's)
            assert row["sampler_gpu_peak_gb"] > 0
    # every push checked: the pool's greedy log-prob of a fixed prompt against the trainer's, summed
    # over its ~10 tokens. The transformers engine runs the trainer's kernels (1e-7 measured in bf16).
    # vLLM runs its own (FlashAttention 3, fused norms): in bf16 a logit near 10 is rounded to a
    # multiple of 1/16, and the two sides' roundings differ, 2e-3 to 2.1e-2 summed over a completion
    # (2e-4 to 2e-3 a token) measured on this test. In float32 the gap was still 4e-5 to 4.8e-3
    # summed, 4e-6 to 4.0e-4 a token (H100, 2026-12-07): vLLM's float32 path on CUDA is not the
    # trainer's arithmetic either (not yet traced; Triton kernels take float32 dot products in TF32
    # by default). The push's exactness itself is tests/gpu/test_vllm_cuda.py's: an engine given the
    # weights in memory against a fresh engine started on the same weights.
    checked = [g for g in gaps if g is not None]
    assert len(checked) >= 3, gaps
    if backend == "transformers":
        assert max(checked) < 1e-4, gaps
    elif cfg.model.dtype == "float32":
        assert max(checked) < 1e-2 and max(p for p in per_token if p is not None) < 1e-3, (gaps, per_token)
    else:
        assert max(checked) < 5e-2 and max(p for p in per_token if p is not None) < 5e-3, (gaps, per_token)
    # from step 3 on the pool got its weights pushed in memory, not a folder
    assert all(r["push_mb"] > 0 for r in rows[2:] if r.get("syncs")), rows
    if dcoa:
        assert sum(r["dropped"] for r in rows) > 0, rows  # candidates dropped, and refilled from the stream
    else:
        assert all(r["candidates"] - r["dropped"] == 2 for r in rows[1:]), rows  # 2 groups with a signal a step
    summary = json.loads((tmp_path / "eval" / "epoch_001.summary.json").read_text())
    sampler = summary["provenance"]["sampler"]
    if cfg.evaluation.sampler == "pool":
        assert sampler == f"vllm pool, the weights of step {rows[-1]['step']} pushed in memory", summary
        assert summary["samples_per_problem"] == 16 and summary["problems"] == 16, summary
    else:
        assert sampler == "transformers, the live weights", summary
