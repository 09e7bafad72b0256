"""Test tiers: tests marked `gpu` are skipped where torch sees no CUDA device (CI never has one)."""

import json
import os
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


def _cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


@pytest.fixture
def golden():
    """``golden(name, metrics)``: the run's per-step losses equal the recorded ones to 1e-6 relative.

    A refactor of the training path must keep them; record them anew (``PASSN_UPDATE_GOLDEN=1``)
    only for a change that is meant to change what is trained, and say so in its commit. On a CPU
    whose vector unit differs from the recording's (other matmul kernels) the tolerance is 1e-4,
    and for a run that samples (``sampled_after``: its first step that trains on samples) only the
    steps before it are compared: another CPU may draw other tokens from the same seed.
    """

    def check(name: str, metrics: list[dict], sampled_after: int | None = None, record: bool = True) -> None:
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
        rtol = GOLDEN_RTOL if same_cpu else 1e-4
        want = recorded["steps"]
        assert [s["step"] for s in losses] == [s["step"] for s in want], name
        if not same_cpu and sampled_after is not None:
            want, losses = want[: sampled_after - 1], losses[: sampled_after - 1]
        for got, expected in zip(losses, want):
            assert got["loss"] == pytest.approx(expected["loss"], rel=rtol, abs=0), (name, got, expected, rtol)

    return check
