"""Storage faults injected into real processes: a disk that fills during a checkpoint save, an S3
server stopped mid-upload and started again, an S3 server that throttles (503 SlowDown).

Each checks what RELIABILITY.md promises: a checkpoint exists only once its manifest is written, a
failed save leaves the previous one valid and no scratch folder behind, and passn's S3 reads and
writes ride out throttling."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from passn import checkpoint as ckpt
from passn.collective import OneProcess
from passn.config import load_config
from trainer.loop import build, train

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
# one process, no Ray: 64 problems, 32 sequences a step, one epoch = 2 steps, a checkpoint at step 2
SMALL = ["task.synthetic.num_train=64", "task.synthetic.num_test=8", "optim.epochs=1", "optim.sequences_per_step=32",
         "optim.micro_sequences_per_worker=32", "storage.checkpoint_every_steps=2", "resources.backend=ddp",
         "resources.num_workers=1", "evaluation.samples_per_problem=4", "evaluation.k_grid=[1,4]"]

# The save runs in its own process under RLIMIT_FSIZE: any file it writes past the limit fails with
# EFBIG ("File too large"), as a full disk fails a write with ENOSPC. SIGXFSZ is ignored so the
# write raises instead of killing the process.
DISK_FULL_SAVE = textwrap.dedent("""
    import resource, signal, sys, torch
    from passn.collective import OneProcess
    from passn.config import load_config
    from trainer.loop import build
    run_dir, limit, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    run = build(load_config(%r, overrides), run_dir, OneProcess(), torch.device("cpu"))
    assert run.state.step == 2, run.state.step
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    run.state.step = 3
    try:
        run.state.save(epoch_end=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        run.close()
""") % TINY


def test_a_disk_full_during_a_save_leaves_the_previous_checkpoint_and_no_staging(tmp_path, monkeypatch):
    run_dir, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    torch.set_num_threads(1)
    cfg = load_config(TINY, SMALL)
    train(cfg, str(run_dir), OneProcess(), torch.device("cpu"))
    before = ckpt.newest_valid_checkpoint(str(run_dir), warn=lambda m: pytest.fail(m))
    assert before.step == 2
    weights = before.manifest["files"]["model/model.safetensors"]["bytes"]

    # half the weights file: the optimizer state and the weights cannot be written, the small files can
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)]), "TMPDIR": str(tmp)}
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_SAVE, str(run_dir), str(weights // 2), *SMALL],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout[-2000:]
    # the error names the checkpoint, the step and the likely cause (torch's own says "iostream error")
    assert f"CheckpointError: {ckpt.checkpoint_dir(str(run_dir), 3)}: saving step 3 failed" in proc.stderr, \
        proc.stderr[-2000:]
    assert "disk (or its quota) full" in proc.stderr

    # no staging folder left behind, and nothing at step 3 counts as a checkpoint
    assert [p.name for p in tmp.iterdir() if p.name.startswith("passn-")] == []
    skipped: list[str] = []
    after = ckpt.newest_valid_checkpoint(str(run_dir), warn=skipped.append)
    assert after.step == 2 and after.manifest == before.manifest
    assert all("step_00000003" in m for m in skipped)
    assert not Path(ckpt.checkpoint_dir(str(run_dir), 3), ckpt.MANIFEST).exists()

    # a resume loads step 2 (weights, optimizer, generators, data position)
    said: list[str] = []
    run = build(cfg, str(run_dir), OneProcess(), torch.device("cpu"), say=lambda *a, **k: said.append(a[0]))
    try:
        assert run.state.step == 2
        assert any(m.startswith("resuming from step 2") for m in said), said
    finally:
        run.close()
