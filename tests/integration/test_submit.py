"""`passn submit` against a real Ray head on 127.0.0.1 (`ray start --head --block`, token
authentication on, stopped by PID): a training job runs to SUCCEEDED and its logs and results are
read back; a wrong token is refused with a clear message."""

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head(tmp_path_factory, free_ports):
    root = tmp_path_factory.mktemp("head")
    token = secrets.token_hex(16)
    (root / "token").write_text(token + "\n")
    (root / "wrong").write_text("not-the-token\n")
    gcs, dashboard = free_ports(2)
    # the cluster's `python` is this environment's, as an image's would be on a real cluster
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log = open(root / "head.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", "--include-dashboard=true",
         f"--temp-dir={root / 'ray'}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (root / "head.log").read_text()[-3000:]
        time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the Ray head did not come up:\n" + (root / "head.log").read_text()[-3000:])
    yield {"url": url, "root": root}
    os.killpg(proc.pid, signal.SIGTERM)  # stopped by PID: --block takes the head's processes down with it
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def passn(*args, token="token"):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)


def test_a_training_job_runs_to_succeeded_and_is_read_back(head, tmp_path):
    run_dir = tmp_path / "run"
    out = passn("submit", "configs/tiny.yaml", "--address", head["url"], "--token-file", str(head["root"] / "token"),
                "--set", "task.synthetic.num_train=128", "--set", "task.synthetic.num_test=64",
                "--set", "optim.epochs=1", "--set", "optim.sequences_per_step=32", "--set", "resources.num_workers=1",
                "--", "train", "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("submitted "))
    assert f"job {job}: SUCCEEDED" in out.stdout
    assert "step 4/4" in out.stdout  # the job's own log lines were followed
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "eval" / "epoch_001.summary.json").exists()
    status = passn("status", job, "--address", head["url"], "--token-file", str(head["root"] / "token"))
    assert status.returncode == 0 and f"{job}: SUCCEEDED" in status.stdout
    logs = passn("logs", job, "--address", head["url"], "--token-file", str(head["root"] / "token"))
    assert logs.returncode == 0 and "step 4/4" in logs.stdout
    assert "AWS_SECRET" not in logs.stdout


def test_a_wrong_token_is_refused_clearly(head):
    out = passn("submit", "configs/tiny.yaml", "--address", head["url"], "--token-file", str(head["root"] / "wrong"),
                "--", "train", "--run-dir", "/nonexistent")
    assert out.returncode == 2
    assert "refused the Ray token" in out.stderr or "403" in out.stderr, out.stderr[-2000:]
    missing = passn("status", "nope", "--address", head["url"])
    assert missing.returncode == 2 and "requires a Ray token" in missing.stderr, missing.stderr[-2000:]
