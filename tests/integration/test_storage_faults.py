"""Storage faults injected into real processes: a disk that fills during a checkpoint save, an S3
server that throttles (503 SlowDown).

Each checks what RELIABILITY.md promises: a checkpoint exists only once its manifest is written, a
failed save leaves the previous one valid and no scratch folder behind, and passn's S3 reads and
writes ride out throttling."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from passn import checkpoint as ckpt
from passn.collective import OneProcess
from passn.config import load_config
from passn.storage import TIMEOUT_ENV
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


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A finished two-step run in one process, its checkpoint at step 2 (tests copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("small") / "run"
    torch.set_num_threads(1)
    train(load_config(TINY, SMALL), str(run_dir), OneProcess(), torch.device("cpu"))
    return run_dir


def test_a_disk_full_during_a_save_leaves_the_previous_checkpoint_and_no_staging(small_run, tmp_path, monkeypatch):
    run_dir, tmp = tmp_path / "run", tmp_path / "tmp"
    shutil.copytree(small_run, run_dir)
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    cfg = load_config(TINY, SMALL)
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


# ---------------------------------------------------------------------------------------------
# S3: a proxy in front of the real SeaweedFS server injects throttling and outages
# ---------------------------------------------------------------------------------------------

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message><RequestId>passn-test</RequestId></Error>')


class S3Proxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of an S3 endpoint (fault injection): it answers the
    first ``throttle`` requests with 503 SlowDown and forwards the rest, calling ``after_forward(method,
    path)`` after each; a request the upstream cannot take (it is down) gets its connection closed."""

    def __init__(self, upstream: str, throttle: int = 0, after_forward=None) -> None:
        import http.client
        import http.server
        import threading
        from urllib.parse import urlsplit

        self.throttle, self.after_forward = throttle, after_forward
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.lock = threading.Lock()
        host, port = urlsplit(upstream).hostname, urlsplit(upstream).port
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return data
                        data += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _any(self):
                body = self._body()
                with proxy.lock:
                    throttled = len(proxy.requests) < proxy.throttle
                    proxy.requests.append((self.command, self.path, 503 if throttled else 0))
                if throttled:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD answer has the headers only
                        self.wfile.write(SLOW_DOWN)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                try:
                    up = http.client.HTTPConnection(host, port, timeout=60)
                    up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in headers.items():
                        up.putheader(k, v)
                    up.endheaders(body)
                    resp = up.getresponse()
                    data = resp.read()
                except OSError:  # the server is down: the client sees its connection drop
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.send_response_only(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                up.close()
                if proxy.after_forward is not None:
                    proxy.after_forward(self.command, self.path)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "S3Proxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_env(monkeypatch):
    """``s3_env(endpoint_url)``: the AWS-style environment passn's fsspec paths read, on a fresh
    s3fs instance cache (instances are cached by arguments, not by environment)."""
    import s3fs

    from tests.integration.conftest import ACCESS_KEY, SECRET_KEY

    def point_at(endpoint_url: str) -> None:
        for key, value in {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                           "AWS_ENDPOINT_URL": endpoint_url, "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()

    yield point_at
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_throttling_is_retried_with_backoff(small_run, s3_server, s3_env, tmp_path):
    # a real checkpoint's files, staged locally
    local = tmp_path / "stage"
    saved = ckpt.newest_valid_checkpoint(str(small_run))
    ckpt.download_tree(saved.path, local, only=saved.manifest["files"])
    throttled = 3
    with S3Proxy(s3_server.endpoint_url, throttle=throttled) as proxy:
        s3_env(proxy.url)
        remote = ckpt.checkpoint_dir(f"s3://{s3_server.bucket}/throttled-{tmp_path.name}", 2)
        started = time.monotonic()
        ckpt.upload_tree(local, remote)  # passn's commit: every file, then the manifest
        ckpt.write_manifest(remote, ckpt.digest_tree(local), **{k: v for k, v in saved.manifest.items()
                                                                 if k not in ("files", "format", "created")})
        took = time.monotonic() - started
        statuses = [status for _, _, status in proxy.requests]
        assert statuses[:throttled] == [503] * throttled and 503 not in statuses[throttled:]
        # reads, throttled five in a row: as many as botocore's default 5 attempts, and s3fs retries a
        # throttled HEAD (an answer without a body, so without "SlowDown") no further
        proxy.throttle = len(proxy.requests) + 5
        verified = ckpt.verify_checkpoint(remote)
        ckpt.download_tree(remote, tmp_path / "back", only=verified.manifest["files"])
    assert verified.step == 2 and verified.manifest["files"] == saved.manifest["files"]
    assert ckpt.digest_tree(tmp_path / "back") == saved.manifest["files"]
    assert took > 0.5, took  # backed off between the 503s, not a tight loop



def test_an_s3_outage_mid_upload_then_a_resume_from_the_last_committed_checkpoint(tmp_path, free_ports, s3_env,
                                                                                  monkeypatch):
    """The S3 server is killed (SIGKILL) while step 4's checkpoint is being uploaded, the run fails
    naming that save, the server comes back on its data, and the resume continues from step 2 (the
    last checkpoint whose manifest was written) to the losses of a run that was never interrupted."""
    from tests.integration.conftest import start_seaweedfs, stop_seaweedfs
    from trainer.state import read_metrics

    overrides = [*SMALL, "optim.epochs=2"]  # 4 steps, checkpoints after steps 2 and 4
    cfg = load_config(TINY, overrides)
    torch.set_num_threads(1)
    plain = tmp_path / "plain"
    train(cfg, str(plain), OneProcess(), torch.device("cpu"))
    want = [(m["step"], m["loss"]) for m in read_metrics(str(plain))]
    assert [s for s, _ in want] == [1, 2, 3, 4]

    root, ports = tmp_path / "weed", free_ports(8)
    root.mkdir()
    server_proc, server = start_seaweedfs(root, ports)
    killed: list[str] = []

    def kill_mid_upload(method: str, path: str) -> None:
        # after the first object of step 4's checkpoint has been stored: the rest of it never arrives
        if method == "PUT" and "step_00000004" in path and not killed:
            killed.append(path)
            stop_seaweedfs(server_proc, signal.SIGKILL)

    run_dir = f"s3://{server.bucket}/outage-{tmp_path.name}"
    monkeypatch.setenv(TIMEOUT_ENV, "20")  # each file's deadline: 20 s (and 1 s a MiB) instead of 300
    try:
        with S3Proxy(server.endpoint_url, after_forward=kill_mid_upload) as proxy:
            s3_env(proxy.url)
            with pytest.raises(Exception) as failed:
                train(cfg, run_dir, OneProcess(), torch.device("cpu"))
            assert killed, "the outage was never injected"
            # named: the checkpoint, its step, the file the storage did not take, and what to do
            message = str(failed.value)
            assert isinstance(failed.value, ckpt.CheckpointError), repr(failed.value)
            assert f"{ckpt.checkpoint_dir(run_dir, 4)}: saving step 4 failed: " in message, message
            assert "the storage did not take the file within 20 s" in message and "resume once" in message

            server_proc, server = start_seaweedfs(root, ports)  # the same data and ports, behind the same proxy
            s3_env(proxy.url)
            plan = ckpt.plan_resume(run_dir, warn=lambda m: None)
            assert plan.path == ckpt.checkpoint_dir(run_dir, 2), plan
            said: list[str] = []
            run = build(cfg, run_dir, OneProcess(), torch.device("cpu"), say=lambda *a, **k: said.append(a[0]),
                        resume=plan)
            run.close()
            assert any(m.startswith("resuming from step 2") for m in said), said
            train(cfg, run_dir, OneProcess(), torch.device("cpu"), resume=plan)
            got = [(m["step"], m["loss"]) for m in read_metrics(run_dir)]
    finally:
        if server_proc.poll() is None:
            stop_seaweedfs(server_proc)
    assert got == want  # bitwise: the resumed steps 3 and 4 are the uninterrupted run's
