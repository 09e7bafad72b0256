"""`passn train` on the real pretrained model (SmolLM2-135M-Instruct, BPE tokenizer, chat
template) and the arithmetic word problems: DCO through a killed worker and its resume, for a few
steps on the CPU."""

import json
import math

import pytest
from passn.arithmetic import arithmetic_splits
from passn.config import load_config

from jobs.train import FAULT_ENV, fault_marker, run_training

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("arithmetic")
    train, test = arithmetic_splits(16, 4, seed=0, max_steps=2)
    for split, rows in (("train", train), ("test", test)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def real(model: str, data, *overrides: str):
    # 16 problems, 4 sequences a step (2 micro-batches of 2): 4 steps; checkpoints after steps 2 and 4
    return load_config(None, [
        "model.tiny=null", f"model.path={model}", "model.dtype=float32", "task.kind=math", "task.variant=cot",
        f"task.train_path={data / 'train.jsonl'}", f"task.test_path={data / 'test.jsonl'}",
        "optim.epochs=1", "optim.sequences_per_step=4", "optim.micro_sequences_per_worker=2",
        "optim.learning_rate=1e-5", "optim.warmup_steps=0", "storage.checkpoint_every_steps=2",
        "resources.num_workers=1", "resources.cpus_per_worker=1", "sampling.max_new_tokens=24",
        "evaluation.samples_per_problem=1", "evaluation.k_grid=[1]", *overrides])


def test_dco_on_the_real_model_survives_a_killed_worker(real_model, arithmetic, tmp_path, monkeypatch):
    """DCO (CE is the same step with other coefficients: the golden-loss tests) through
    a worker killed after step 3, resumed from the step-2 checkpoint."""
    monkeypatch.setenv(FAULT_ENV, "0:3")
    run_dir = tmp_path / "dco"
    rows = run_training(real(real_model, arithmetic, "objective.kind=dco", "objective.budget=8",
                             "resources.max_failures=1"), str(run_dir))
    assert fault_marker(str(run_dir)).exists()  # the worker really died
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(0 < r["weight_mean"] <= 1 for r in rows), rows  # F(N', p) of references the model finds unlikely
