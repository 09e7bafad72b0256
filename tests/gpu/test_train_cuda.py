"""A few real DeepSpeed steps on CUDA through the whole `passn train` path (Ray Train, NCCL, bf16)."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).parents[2]


def test_passn_train_on_one_gpu(tmp_path):
    from jobs.train import run_training
    from passn import checkpoint as ckpt
    from passn.config import load_config

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [
        "task.synthetic.num_train=256", "task.synthetic.num_test=64", "optim.epochs=1",
        "optim.sequences_per_step=32", "resources.num_workers=1", "resources.gpus_per_worker=1",
        "resources.cpus_per_worker=2", "model.dtype=bfloat16", "objective.kind=dco", "objective.budget=16"])
    metrics = run_training(cfg, str(tmp_path))
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert ckpt.newest_valid_checkpoint(str(tmp_path)).step == 8
