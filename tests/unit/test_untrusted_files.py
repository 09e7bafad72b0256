"""Files in a run dir or a model folder are data, never code: a pickle planted in DeepSpeed's
training state or a pickled pytorch_model.bin is refused, naming the file, and nothing of it runs.

Each planted pickle would touch a marker file when unpickled (a harmless stand-in for os.system)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from passn import checkpoint as ckpt
from passn.collective import OneProcess
from passn.config import load_config
from passn.models import PickledWeightsError, check_safetensors_weights

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
# 64 problems, 32 sequences a step, 2 epochs: 4 steps, a checkpoint every 2
SHORT = ["task.synthetic.num_train=64", "task.synthetic.num_test=16", "optim.epochs=2", "optim.sequences_per_step=32",
         "optim.micro_sequences_per_worker=16", "storage.checkpoint_every_steps=2", "storage.keep_checkpoints=10",
         "evaluation.every_epochs=100", "resources.backend=deepspeed", "resources.num_workers=1"]


class Touch:
    """Unpickled, it creates ``marker``: what a planted payload could do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def plant(path: Path, marker: Path) -> None:
    """A payload added to a real torch.save file, the way an attacker with write access would."""
    state = torch.load(path, weights_only=False)  # our own file, written by this test's run
    state["payload"] = Touch(marker)
    torch.save(state, path)


def recompute_manifest(checkpoint: str) -> None:
    """The manifest is integrity against corruption, not a signature: anyone can rewrite it."""
    manifest_path = Path(checkpoint) / ckpt.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = {rel: ckpt.file_digest(Path(checkpoint) / rel) for rel in manifest["files"]}
    manifest_path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def deepspeed_here():
    """DeepSpeed in this process (one rank, gloo); the process group is gone again afterwards."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)}.items():
            mp.setenv(key, value)
        torch.set_num_threads(1)
        yield
        if dist.is_initialized():
            dist.destroy_process_group()


def train_run(run_dir: Path, *overrides):
    from trainer.loop import train
    from trainer.state import read_metrics

    cfg = load_config(TINY, [*SHORT, *overrides])
    train(cfg, str(run_dir), OneProcess(), torch.device("cpu"))
    return cfg, read_metrics(str(run_dir))


@pytest.fixture(scope="module", params=[1, 3], ids=["zero1", "zero3"])
def deepspeed_run(request, deepspeed_here, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(f"zero{request.param}")
    cfg, rows = train_run(run_dir, f"resources.zero_stage={request.param}")
    return run_dir, request.param, rows


def test_deepspeed_state_resumes_bitwise_through_the_weights_only_load(deepspeed_run, tmp_path):
    full, stage, rows = deepspeed_run
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for path in ckpt.list_checkpoints(str(part)):
        if not path.endswith("step_00000002"):
            shutil.rmtree(path)
    metrics = part / "metrics.jsonl"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(keepends=True)
                               if json.loads(line)["step"] <= 2))
    _, resumed = train_run(part, f"resources.zero_stage={stage}")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]  # bitwise


@pytest.mark.parametrize("shard", ["model_states", "optim_states"])
def test_a_pickle_planted_in_deepspeed_state_is_refused_on_resume(deepspeed_run, shard, tmp_path):
    from trainer.loop import build

    full, stage, _ = deepspeed_run
    run_dir = tmp_path / "run"
    shutil.copytree(full, run_dir)
    newest = ckpt.list_checkpoints(str(run_dir))[0]
    (target,) = Path(newest, "state", "state").glob(f"*{shard}.pt")
    marker = tmp_path / "code-ran"
    plant(target, marker)
    recompute_manifest(newest)
    assert ckpt.verify_checkpoint(newest).step == 4  # the manifest does not notice
    named = f"{newest}/state/state/{target.name}: pickles "

    with pytest.raises(ckpt.CheckpointError) as driver:  # the driver's check, before Ray starts
        ckpt.check_state_files(str(run_dir))
    assert named in str(driver.value) and "builtins.getattr" in str(driver.value)
    cfg = load_config(TINY, [*SHORT, f"resources.zero_stage={stage}"])
    with pytest.raises(ckpt.CheckpointError) as worker:  # a worker's resume, were the file planted later
        build(cfg, str(run_dir), OneProcess(), torch.device("cpu"), say=lambda *a, **k: None)
    assert named in str(worker.value) and "which passn does not load" in str(worker.value)
    assert "weights_only=False" not in str(worker.value)
    assert not marker.exists()


def test_the_ddp_optimizer_state_is_loaded_weights_only(tmp_path):
    from trainer.engines import load_training_state

    marker = tmp_path / "code-ran"
    torch.save({"optimizer": {}, "payload": Touch(marker)}, tmp_path / "optimizer.pt")
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt: pickles getattr, which passn does not load"):
        load_training_state(str(tmp_path / "optimizer.pt"), allowed=())
    assert not marker.exists()


def pickled_model_folder(folder: Path, marker: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"payload": Touch(marker)}, folder / "pytorch_model.bin")
    return folder


def test_a_model_folder_without_safetensors_is_refused(tmp_path):
    folder = pickled_model_folder(tmp_path / "model", tmp_path / "code-ran")
    with pytest.raises(PickledWeightsError) as refused:
        check_safetensors_weights(str(folder))
    assert str(refused.value).startswith(f"{folder}: no *.safetensors weights (found pytorch_model.bin; "
                                         "passn loads no pickled weights: convert it with")
    (folder / "model.safetensors").write_bytes(b"")
    check_safetensors_weights(str(folder))  # beside a .bin, the safetensors are what loads


def test_evaluate_on_a_pickled_model_folder_exits_2_before_ray(tmp_path):
    marker = tmp_path / "code-ran"
    folder = pickled_model_folder(tmp_path / "model", marker)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", "--checkpoint", str(folder), "--config", TINY,
                          "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"passn evaluate: {folder}: no *.safetensors weights (found pytorch_model.bin;" in out.stderr
    assert "Traceback" not in out.stderr and "weights_only" not in out.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
