"""passn.scratch: scratch folders carry their owner's PID; the sweep removes those of dead
processes only, and nothing not named as passn's."""

import os
import subprocess
import sys

from passn.scratch import scratch, scratch_dir, sweep_stale


def test_the_sweep_removes_the_folders_of_dead_processes_only(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)  # exited: its folders are stale
    live = scratch_dir("resume")  # this process's: kept
    assert live.name.startswith(f"passn-resume-pid{os.getpid()}-")
    stale = [tmp_path / f"passn-ckpt-pid{dead_pid}-x1", tmp_path / f"passn-policy-rank1-pid{dead_pid}-x2"]
    for folder in stale:
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "model.safetensors").write_bytes(b"weights")
    others = [tmp_path / "passn-ray-abc", tmp_path / f"other-pid{dead_pid}-x", tmp_path / "passn-fault-12ab"]
    others[0].mkdir(), others[1].mkdir(), others[2].write_text("")  # no PID in the name, not passn's, a file
    assert sorted(sweep_stale()) == sorted(stale)
    assert live.is_dir() and all(p.exists() for p in others) and not any(p.exists() for p in stale)


def test_a_scratch_folder_is_removed_however_its_block_ends(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    try:
        with scratch("ckpt") as local:
            (local / "f").write_text("x")
            raise RuntimeError("died mid-save")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []
