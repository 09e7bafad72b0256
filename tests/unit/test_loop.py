"""trainer.loop in one plain process, no Ray: the same loop Ray Train runs on each worker.

Its losses match the golden file of the 2-worker Ray + DeepSpeed run (another engine and worker
count: float tolerance), micro-batching does not change them, and a resume is bitwise."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from passn import checkpoint as ckpt
from passn.collective import OneProcess
from passn.config import load_config
from trainer.loop import train
from trainer.state import read_metrics

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
# tests/integration/test_train.py's SHORT run: 256 problems, 32 sequences a step, 2 epochs: 16 steps
SHORT = ["task.synthetic.num_train=256", "task.synthetic.num_test=64", "optim.epochs=2",
         "optim.sequences_per_step=32", "optim.micro_sequences_per_worker=8", "storage.checkpoint_every_steps=4",
         "resources.backend=ddp", "resources.num_workers=1"]


def run(run_dir, *overrides):
    cfg = load_config(TINY, [*SHORT, *overrides])
    torch.set_num_threads(1)
    train(cfg, str(run_dir), OneProcess(), torch.device("cpu"))
    return read_metrics(str(run_dir))


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory):
    """The CE run's directory and rows (the directory's name depends on what else the session made)."""
    run_dir = tmp_path_factory.mktemp("ce")
    return run_dir, run(run_dir, "storage.keep_checkpoints=10")


@pytest.fixture(scope="module")
def ce_rows(ce_run):
    return ce_run[1]


def test_one_process_ce_gives_the_ray_runs_golden_losses(ce_rows, golden):
    # the golden run: 2 Ray Train workers of 16 sequences, DeepSpeed ZeRO-2; here one process of 32, torch AdamW
    assert [r["step"] for r in ce_rows] == list(range(1, 17))
    golden("ce", ce_rows, record=False)  # 1e-6 relative (measured: 6e-8)
    assert all(r["sequences"] == 32 and r["weight_mean"] == 1.0 for r in ce_rows)


def test_micro_batching_does_not_change_the_losses(ce_rows, tmp_path):
    rows = run(tmp_path, "optim.micro_sequences_per_worker=32", "optim.epochs=1")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ce_rows[:8]], rel=1e-5)


def test_dco_with_refill_in_one_process_gives_the_golden_losses(tmp_path, golden):
    rows = run(tmp_path, "objective.kind=dco", "objective.budget=256", "objective.refill_threshold=0.3",
               "optim.epochs=4")
    assert all(r["sequences"] == 32 and r["weight_min"] >= 0.3 for r in rows)
    assert sum(r["dropped"] for r in rows) > 0
    assert len(rows) < 32  # dropping consumes the stream faster than training: fewer steps than 4 epochs x 8
    golden("dco_refill", rows)  # checked here only: this run owns the file


def test_dco_with_budget_one_gives_the_ce_losses_exactly(ce_rows, tmp_path):
    rows = run(tmp_path, "objective.kind=dco", "objective.budget=1", "storage.keep_checkpoints=10")
    assert [r["loss"] for r in rows] == [r["loss"] for r in ce_rows]  # F(1, p) = 1: CE bit for bit


def test_a_resume_in_one_process_is_bitwise(ce_run, tmp_path_factory):
    full, ce_rows = ce_run
    part = tmp_path_factory.mktemp("resumed")
    # the full run's directory with everything after step 8 removed: as if it had died there
    shutil.copytree(full, part, dirs_exist_ok=True)
    for path in ckpt.list_checkpoints(str(part)):
        if int(Path(path).name.split("_")[-1]) > 8:
            shutil.rmtree(path)
    metrics = part / "metrics.jsonl"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(keepends=True)
                               if json.loads(line)["step"] <= 8))
    rows = run(part, "storage.keep_checkpoints=10")
    assert [r["loss"] for r in rows] == [r["loss"] for r in ce_rows]  # bitwise


def test_deepspeed_starts_beside_a_lock_a_killed_build_left(tmp_path):
    """A worker killed while building a torch extension leaves its lock file, on which every later
    build waits without end; DeepSpeed's start-up builds its CPU shared-memory all-reduce op that
    way unless passn skips it (it serves only DeepSpeed's inference), so a trainer started beside
    such a lock must train, not wait."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    extensions = tmp_path / "extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()  # as a killed build leaves it
    script = (
        "import sys, torch\n"
        "from passn.collective import OneProcess\nfrom passn.config import load_config\n"
        "from trainer.loop import train\n"
        f"cfg = load_config({TINY!r}, [*{SHORT!r}, 'resources.backend=deepspeed', 'optim.epochs=1',\n"
        "                  'task.synthetic.num_train=64', 'storage.checkpoint_every_steps=100'])\n"
        "torch.set_num_threads(1)\n"
        "train(cfg, sys.argv[1], OneProcess(), torch.device('cpu'))\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT), env.get("PYTHONPATH", "")])
    run_dir = tmp_path / "run"
    try:
        out = subprocess.run([sys.executable, "-c", script, str(run_dir)], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("DeepSpeed's start-up waited on the stale extension lock")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(read_metrics(str(run_dir))) == 2  # 64 problems, 32 sequences a step
