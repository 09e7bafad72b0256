"""NVLink multicast stays off in every process a passn job starts (jobs.cluster.MULTICAST_OFF): the
CLI's own and its Ray workers, unless the environment that starts passn says otherwise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
NAMES = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")

PROBE = """
import json, os, sys
import ray
from jobs.cli import main
from jobs.cluster import ray_session

main(["model", "list"])  # the CLI sets the defaults in its own process
driver = {k: os.environ.get(k) for k in sys.argv[1:]}
os.environ.pop("TORCH_SYMM_MEM_DISABLE_MULTICAST")  # a worker gets them even where the driver lost one
with ray_session(num_cpus=1):
    worker = ray.get(ray.remote(lambda names: {k: os.environ.get(k) for k in names}).remote(sys.argv[1:]), timeout=300)
print("PROBE" + json.dumps({"driver": driver, "worker": worker}))
"""


def test_the_cli_and_its_ray_workers_run_with_multicast_off_and_an_explicit_setting_wins():
    env = {k: v for k, v in os.environ.items() if k not in NAMES and not k.startswith("RAY_ADDRESS")}
    env["NCCL_NVLS_ENABLE"] = "1"  # the user's explicit choice is kept
    done = subprocess.run([sys.executable, "-c", PROBE, *NAMES], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("PROBE"))[5:])
    expected = {"NCCL_NVLS_ENABLE": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    assert seen["driver"] == expected and seen["worker"] == expected, seen
