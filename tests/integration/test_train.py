"""passn train end to end: real local Ray, Ray Train with 2 workers, DeepSpeed ZeRO-2 on gloo (CPU)."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from jobs.train import FAULT_ENV, fault_marker, read_metrics, run_training
from passn import checkpoint as ckpt
from passn.config import load_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
# 256 problems, 32 sequences a step over 2 workers (2 micro-batches of 8 each): 8 steps an epoch
SHORT = ["task.synthetic.num_train=256", "task.synthetic.num_test=64", "optim.epochs=2",
         "optim.sequences_per_step=32", "optim.micro_sequences_per_worker=8", "storage.checkpoint_every_steps=4"]


def short(*overrides):
    return load_config(TINY, [*SHORT, *overrides])


LEFT_BEHIND: list[str] = []  # passn's scratch folders the CE run left in its temp dir


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("ce"))
    # the run's own temp dir (driver, Ray and its workers): short, as Ray's socket paths must be
    tmp = tempfile.mkdtemp(prefix="ce-tmp-")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TMPDIR", tmp)
        env.setattr("tempfile.tempdir", tmp)
        metrics = run_training(short(), run_dir)
    LEFT_BEHIND.extend(sorted(p for p in os.listdir(tmp) if p.startswith("passn-")))
    shutil.rmtree(tmp, ignore_errors=True)
    return run_dir, metrics


# DCO with N' = 1 against CE and the refill's golden losses run in one process, without Ray:
# tests/unit/test_loop.py (its losses equal this file's 2-worker goldens within 1e-6).


def test_ce_run_writes_valid_checkpoints_metrics_and_evaluations(ce_run, golden):
    golden("ce", ce_run[1])
    run_dir, metrics = ce_run
    assert [m["step"] for m in metrics] == list(range(1, 17))
    assert all(m["sequences"] == 32 and m["dropped"] == 0 and m["weight_mean"] == 1.0 for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert LEFT_BEHIND == []  # staging, resume, metrics and Ray's storage folders: all removed
    newest = ckpt.newest_valid_checkpoint(run_dir, warn=lambda m: pytest.fail(m))
    assert newest.step == 16 and newest.manifest["data_position"] == {"epoch": 2, "cursor": 0}
    files = newest.manifest["files"]
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json", "rng/rank_0.json",
            "rng/rank_1.json"} <= set(files)
    # every rank's ZeRO-2 optimizer shard is in the checkpoint
    assert {f"state/state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(files)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(newest.model_dir, use_safetensors=True)
    assert AutoTokenizer.from_pretrained(newest.model_dir)("ab=").input_ids == [1, 14, 15, 3]
    assert model.config.head_dim == 32
    for epoch in (1, 2):
        summary = json.loads(Path(run_dir, f"eval/epoch_{epoch:03d}.summary.json").read_text())
        assert summary["problems"] == 64 and set(summary["pass_at_k"]) == {"1", "4", "16", "64", "256"}
        rows = Path(run_dir, f"eval/epoch_{epoch:03d}.jsonl").read_text().splitlines()
        assert len(rows) == 64 and {"greedy_confidence", "greedy_correct"} <= set(json.loads(rows[0]))
    assert list(Path(run_dir, "tensorboard").glob("events.out.tfevents.*"))
    # checkpoints every 4 steps, three kept
    assert [c.rsplit("_", 1)[-1] for c in ckpt.list_checkpoints(run_dir)] == ["00000016", "00000012", "00000008"]


def test_a_killed_worker_is_retried_from_the_checkpoint_with_identical_losses(ce_run, tmp_path, monkeypatch):
    _, ce_metrics = ce_run
    monkeypatch.setenv(FAULT_ENV, "1:6")  # rank 1 dies after step 6; the last checkpoint is step 4
    run_dir = str(tmp_path / uuid.uuid4().hex)
    metrics = run_training(short("resources.max_failures=1"), run_dir)
    assert fault_marker(run_dir).exists()  # the worker really died
    assert [m["loss"] for m in metrics] == [m["loss"] for m in ce_metrics]  # bitwise


@pytest.mark.chaos
@pytest.mark.parametrize("moment", ["random", "mid-save"])
def test_a_worker_sigkilled_from_outside_is_retried_with_identical_losses(ce_run, tmp_path, moment):
    """A training worker is SIGKILLed by another process, with no hook in passn's code: at a random
    moment after step 3 (seeded, so a failure can be replayed), or while it writes a checkpoint after
    the first (its staging folder exists). Ray Train retries the group from the last checkpoint, the losses are the
    uninterrupted run's bitwise, the newest checkpoint verifies, and no scratch folder is left."""
    import random
    import re
    import signal
    import threading

    import psutil

    _, ce_metrics = ce_run
    tmp = Path(tempfile.mkdtemp(prefix="kill-"))  # short: Ray's socket paths live under it
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "jobs.train", TINY, "--run-dir", run_dir, *sum((["--set", o] for o in SHORT), []),
           "--set", "resources.max_failures=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def workers() -> list[psutil.Process]:
        found = []
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    rng = random.Random(20261207)
    killed, deadline = None, time.monotonic() + 600
    try:
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            if moment == "random":
                if any("step 3/16" in line for line in lines):
                    time.sleep(rng.uniform(0.0, 1.0))
                    victim = rng.choice(workers())
                    victim.send_signal(signal.SIGKILL)
                    killed = f"pid {victim.pid} after step 3"
            elif Path(ckpt.checkpoint_dir(run_dir, 4), ckpt.MANIFEST).exists():  # a later save than the first
                staging = [m for m in (re.fullmatch(r"passn-ckpt-pid(\d+)-.+", n) for n in os.listdir(tmp)) if m]
                if staging:
                    pid = int(staging[0].group(1))
                    os.kill(pid, signal.SIGKILL)
                    killed = f"pid {pid} while it wrote {staging[0].group(0)}"
            time.sleep(0.005)
        assert killed, "no worker was killed: " + "".join(lines)[-3000:]
        print("killed", killed)
        assert proc.wait(timeout=600) == 0, "".join(lines)[-5000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=10)
    out = "".join(lines)
    assert "resuming from step" in out or moment == "random", out[-3000:]  # killed before step 4: from the start
    metrics = read_metrics(run_dir)
    assert [m["loss"] for m in metrics] == [m["loss"] for m in ce_metrics]  # bitwise
    assert ckpt.newest_valid_checkpoint(run_dir, warn=lambda m: pytest.fail(m)).step == 16
    assert sorted(n for n in os.listdir(tmp) if n.startswith("passn-")) == []
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.chaos
def test_a_sigkilled_driver_leaves_no_ray_process_behind(tmp_path):
    """`passn train` started its own Ray cluster; the driver alone is SIGKILLed mid-run (not its
    process group): every process it started (Ray's servers, agents, training workers) ends too."""
    import signal

    import psutil

    tmp = Path(tempfile.mkdtemp(prefix="orphan-"))
    cmd = [sys.executable, "-m", "jobs.train", TINY, "--run-dir", str(tmp_path / "run"),
           *sum((["--set", o] for o in SHORT), []), "--set", "optim.epochs=20"]
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp)}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while "step 2/" not in (tmp_path / "train.log").read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            time.sleep(0.5)
        started = psutil.Process(proc.pid).children(recursive=True)
        names = sorted({f"{p.name()}: {' '.join(p.cmdline())[:200]}" for p in started if p.is_running()})
        assert any("RayTrainWorker" in n for n in names) and any("raylet" in n for n in names), names
        proc.send_signal(signal.SIGKILL)  # the driver alone
        proc.wait(timeout=30)
        gone_by = time.monotonic() + 60
        while time.monotonic() < gone_by:
            alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            if not alive:
                break
            time.sleep(1)
        assert not alive, [(p.pid, " ".join(p.cmdline())[:120]) for p in alive]
    finally:
        for p in started:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.chaos
def test_interrupted_run_on_s3_resumes_from_its_checkpoint(ce_run, s3_server, tmp_path):
    _, ce_metrics = ce_run
    run_dir = f"s3://{s3_server.bucket}/runs/{uuid.uuid4().hex}"
    env = {**os.environ, **s3_server.env(), FAULT_ENV: "0:6"}
    cmd = [sys.executable, "-m", "jobs.train", TINY, "--run-dir", run_dir, *sum((["--set", o] for o in SHORT), []),
           "--set", "resources.max_failures=0"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode != 0  # the injected fault ended the run
    fs = s3_server.filesystem()
    assert fs.exists(f"{s3_server.bucket}/runs/{run_dir.rsplit('/', 1)[-1]}/checkpoints/step_00000004/manifest.json"), first.stderr[-3000:]
    env.pop(FAULT_ENV)
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from step 4" in second.stdout + second.stderr
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    os.environ.update(s3_server.env())
    try:
        metrics = read_metrics(run_dir)
        assert [m["loss"] for m in metrics] == [m["loss"] for m in ce_metrics]
        assert ckpt.newest_valid_checkpoint(run_dir).step == 16
    finally:
        for key in s3_server.env():
            os.environ.pop(key, None)


def test_bad_config_or_data_fails_before_any_training(tmp_path):
    def train(*args):
        return subprocess.run([sys.executable, "-m", "jobs.train", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    bad_key = train(TINY, "--run-dir", str(tmp_path / "a"), "--set", "optim.sequences_per_stpe=3")
    assert bad_key.returncode == 2
    assert "optim.sequences_per_stpe: unknown field" in bad_key.stderr and "optim.sequences_per_step" in bad_key.stderr
    data = tmp_path / "math.jsonl"
    data.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "no answer here"}\n')
    bad_rows = train(TINY, "--run-dir", str(tmp_path / "b"), "--set", "task.kind=math",
                     "--set", f"task.train_path={data}", "--set", "model.tiny.alphabet=ascii",
                     "--set", "model.tiny.max_position_embeddings=512")
    assert bad_rows.returncode == 2
    assert f"{data}:2: field \"answer\" is missing" in bad_rows.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "checkpoints").exists()
    # a run dir whose checkpoints all fail verification: refused by the driver, before Ray starts
    corrupt = tmp_path / "corrupt"
    for step in (4, 8):
        remote = Path(ckpt.checkpoint_dir(str(corrupt), step))
        (remote / "model").mkdir(parents=True)
        (remote / "model" / "model.safetensors").write_bytes(b"weights")
        ckpt.write_manifest(str(remote), ckpt.digest_tree(remote), step=step)
        (remote / "model" / "model.safetensors").write_bytes(b"WEIGHTS")  # same size, other bytes
    started = time.monotonic()
    refused = train(TINY, "--run-dir", str(corrupt))
    took = time.monotonic() - started
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.startswith(f"passn train: {corrupt}: no checkpoint verifies ({corrupt}/checkpoints/step_00000008: "
                                     "model/model.safetensors does not match its sha256 in the manifest; "
                                     f"{corrupt}/checkpoints/step_00000004: "), refused.stderr[-3000:]
    assert "move them away (or use a new --run-dir) to start over" in refused.stderr
    assert "Traceback" not in refused.stderr and "Ray" not in refused.stdout + refused.stderr, refused.stderr[-3000:]
    assert took < 60, f"{took:.0f} s"  # before Ray starts: no cluster, no worker hashing every file
    missing = train(TINY, "--run-dir", str(tmp_path / "c"), "--set", "model.tiny=null",
                    "--set", f"model.path={tmp_path / 'no-such-model'}")
    assert missing.returncode == 2 and missing.stderr.startswith("passn train: model.path: "), missing.stderr[-3000:]
    assert "Ray" not in missing.stdout + missing.stderr


@pytest.mark.chaos
def test_ddp_backend_resumes_after_a_killed_worker_with_identical_losses(tmp_path, monkeypatch):
    plain = run_training(short("resources.backend=ddp", "optim.epochs=1"), str(tmp_path / "plain"))
    monkeypatch.setenv(FAULT_ENV, "0:6")
    run_dir = str(tmp_path / uuid.uuid4().hex)
    retried = run_training(short("resources.backend=ddp", "optim.epochs=1", "resources.max_failures=1"), run_dir)
    assert fault_marker(run_dir).exists()
    assert [m["loss"] for m in retried] == [m["loss"] for m in plain]
    assert ckpt.newest_valid_checkpoint(run_dir).manifest["files"]["state/optimizer.pt"]


def test_training_from_a_hugging_face_folder_local_and_on_s3(tmp_path, s3_server, monkeypatch):
    from passn.config import TinyModelSpec
    from passn.models import PickledWeightsError, build_tiny_model, fetch_model_folder, load_model

    model, tokenizer = build_tiny_model(TinyModelSpec(), seed=7)
    folder = tmp_path / "hf-model"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    metrics = run_training(short("model.tiny=null", "model.path=" + str(folder), "optim.epochs=1"), str(tmp_path / "run"))
    assert len(metrics) == 8 and metrics[-1]["loss"] < metrics[0]["loss"]
    # the same folder on S3 is fetched once per node into the model cache
    import s3fs

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PASSN_MODEL_CACHE", str(tmp_path / "cache"))
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3_server.filesystem()
    fs.put(str(folder), f"{s3_server.bucket}/models/tiny", recursive=True)
    url = f"s3://{s3_server.bucket}/models/tiny"
    local = fetch_model_folder(url)
    assert local.startswith(str(tmp_path / "cache")) and fetch_model_folder(url) == local
    loaded, _ = load_model(load_config(TINY, ["model.tiny=null", "model.path=" + url]).model, seed=0)
    assert all((a == b).all() for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    (folder / "model.safetensors").unlink()
    with pytest.raises(PickledWeightsError, match=r"hf-model: no \*\.safetensors weights \(found no weights at all"):
        load_model(load_config(TINY, ["model.tiny=null", "model.path=" + str(folder)]).model, seed=0)
