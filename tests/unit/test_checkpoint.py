"""passn.checkpoint: manifests written last, verified on load; corrupt checkpoints are skipped loudly."""

import json

import pytest

from passn import checkpoint as ckpt


def make_checkpoint(run_dir, step, payload=b"weights"):
    local = run_dir / "staging" / str(step)
    (local / "model").mkdir(parents=True)
    (local / "model" / "model.safetensors").write_bytes(payload)
    (local / "state").mkdir()
    (local / "state" / "shard_rank_1.pt").write_bytes(b"shard" + payload)
    remote = ckpt.checkpoint_dir(str(run_dir), step)
    ckpt.upload_tree(local, remote)
    ckpt.write_manifest(remote, ckpt.digest_tree(local), step=step, data_position={"epoch": 0, "cursor": step})
    return remote


def test_newest_valid_checkpoint_is_chosen(tmp_path):
    make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 12)
    found = ckpt.newest_valid_checkpoint(str(tmp_path), warn=lambda m: pytest.fail(m))
    assert found.step == 12 and found.manifest["data_position"] == {"epoch": 0, "cursor": 12}
    assert ckpt.list_checkpoints(str(tmp_path))[-1].endswith("step_00000004")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no_manifest", "bad_json"])
def test_a_corrupt_newest_checkpoint_is_named_and_skipped(tmp_path, damage):
    make_checkpoint(tmp_path, 4)
    newest = make_checkpoint(tmp_path, 8)
    shard = f"{newest}/state/shard_rank_1.pt"
    if damage == "truncate":
        open(shard, "wb").write(b"sh")
    elif damage == "flip":
        open(shard, "wb").write(b"SHARDweights")  # same size, other bytes: only the hash tells
    elif damage == "delete":
        import os

        os.remove(shard)
    elif damage == "no_manifest":
        import os

        os.remove(f"{newest}/manifest.json")
    else:
        open(f"{newest}/manifest.json", "w").write("{")
    warnings = []
    found = ckpt.newest_valid_checkpoint(str(tmp_path), warn=warnings.append)
    assert found.step == 4
    assert len(warnings) == 1 and "step_00000008" in warnings[0]


def test_no_valid_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    newest = make_checkpoint(tmp_path, 8)
    open(f"{newest}/model/model.safetensors", "wb").write(b"x")
    with pytest.raises(ckpt.CheckpointError, match=f"{tmp_path}: no checkpoint verifies \\({newest}: model/model"):
        ckpt.newest_valid_checkpoint(str(tmp_path), warn=lambda m: None)
    assert ckpt.newest_valid_checkpoint(str(tmp_path / "empty")) is None


def test_workers_resume_from_the_drivers_choice_or_what_the_run_wrote_since(tmp_path):
    make_checkpoint(tmp_path, 4)
    bad = make_checkpoint(tmp_path, 8)
    open(f"{bad}/model/model.safetensors", "wb").write(b"WEIGHTS")  # same size: only the hash tells
    plan = ckpt.plan_resume(str(tmp_path), warn=lambda m: None)
    assert plan.path.endswith("step_00000004") and list(plan.refused) == [bad]
    # the driver hashed its choice: a worker does not (damage it now, and the worker does not notice)
    open(f"{tmp_path}/checkpoints/step_00000004/model/model.safetensors", "wb").write(b"WEIGHTX")
    assert ckpt.checkpoint_to_resume(str(tmp_path), plan, warn=pytest.fail).step == 4
    # a restarted worker group: the refused step 8 is still skipped, a step 12 written since is taken
    make_checkpoint(tmp_path, 12)
    assert ckpt.checkpoint_to_resume(str(tmp_path), plan, warn=pytest.fail).step == 12
    # step 8 written again by the run (a new manifest): taken once it verifies
    import shutil

    shutil.rmtree(f"{tmp_path}/checkpoints/step_00000012")
    shutil.rmtree(bad)
    shutil.rmtree(tmp_path / "staging")
    make_checkpoint(tmp_path, 8, payload=b"weight2")
    assert ckpt.checkpoint_to_resume(str(tmp_path), plan, warn=pytest.fail).step == 8
    assert ckpt.plan_resume(str(tmp_path / "empty")) == ckpt.ResumePlan(None)


def test_unsafe_paths_in_a_manifest_are_refused(tmp_path):
    remote = make_checkpoint(tmp_path, 2)
    manifest = json.load(open(f"{remote}/manifest.json"))
    manifest["files"]["../../etc/passwd"] = {"sha256": "0", "bytes": 1}
    json.dump(manifest, open(f"{remote}/manifest.json", "w"))
    with pytest.raises(ckpt.CheckpointError, match="unsafe path"):
        ckpt.verify_checkpoint(remote)


def test_pruning_keeps_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    deleted = ckpt.prune_checkpoints(str(tmp_path), keep=2)
    assert [d.rsplit("_", 1)[-1] for d in deleted] == ["00000004", "00000002"]
    assert [c.rsplit("_", 1)[-1] for c in ckpt.list_checkpoints(str(tmp_path))] == ["00000008", "00000006"]
