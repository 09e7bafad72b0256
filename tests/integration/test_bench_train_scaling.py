"""`passn bench train --gpus`: passn's training path at several worker counts and ZeRO stages, the
scaling efficiency and the failed configurations, run here on CPU workers (gloo) as a check of the
code path that the multi-GPU runs take."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def test_scaling_rows_on_one_and_two_workers_at_zero_2_and_3(tmp_path):
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, "-m", "jobs.cli", "bench", "train", "--gpus", "1,2", "--device", "cpu", "--model", "tiny",
           "--zero", "2,3", "--steps", "3", "--warmup", "1", "--sequences", "2", "--length", "32", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())
    rows = {(row["gpus"], row["zero_stage"]): row for row in r["rows"]}
    assert set(rows) == {(1, 2), (2, 2), (1, 3), (2, 3)}
    for (gpus, zero), row in rows.items():
        assert "error" not in row, row
        assert row["steps_timed"] == 2 and row["s_per_step"] > 0
        assert row["tokens_per_s"] == pytest.approx(2 * 32 / row["s_per_step"])  # per worker
        assert row["scaling_base_gpus"] == 1
        assert row["scaling_efficiency"] == pytest.approx(row["tokens_per_s"] / rows[(1, zero)]["tokens_per_s"])
    assert "runs stage 1" in rows[(1, 2)]["path"] and "runs stage" not in rows[(2, 2)]["path"]  # ZeRO-2 partitions at 2
    assert r["params"] == rows[(2, 3)]["params"] > 4_000_000  # counted, not read from ZeRO-3's empty shards
    assert rows[(1, 2)]["params"] == r["params"] < 5_000_000  # the workers trained --model tiny itself
    assert r["dco_over_ce"] > 0
    assert "ZeRO-2 scaling efficiency from 1 to 2" in done.stdout and "not a measurement" in done.stdout


def test_more_workers_than_the_host_has_is_refused_at_once():
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "bench", "train", "--gpus", "1,4096", "--device", "cpu",
                           "--model", "tiny"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "asks for 4096 CPU workers" in done.stdout
