"""`passn bench train --gpus`: passn's training path on several workers at ZeRO-2 and ZeRO-3, and the
scaling efficiency, run here on CPU workers (gloo) as a check of the code path that the multi-GPU
runs take."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def test_scaling_rows_on_two_workers_at_zero_2_and_3(tmp_path):
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, "-m", "jobs.cli", "bench", "train", "--gpus", "2", "--device", "cpu", "--model", "tiny",
           "--zero", "2,3", "--steps", "3", "--warmup", "1", "--sequences", "2", "--length", "32", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())
    rows = {(row["gpus"], row["zero_stage"]): row for row in r["rows"]}
    assert set(rows) == {(2, 2), (2, 3)}
    for row in rows.values():
        assert "error" not in row, row
        assert row["steps_timed"] == 2 and row["s_per_step"] > 0
        assert row["tokens_per_s"] == pytest.approx(2 * 32 / row["s_per_step"])  # per worker
        assert row["scaling_base_gpus"] == 2 and row["scaling_efficiency"] == 1.0
    assert "runs stage" not in rows[(2, 2)]["path"]  # two workers: ZeRO-2 partitions (one would run stage 1)
    assert r["params"] == rows[(2, 3)]["params"] > 4_000_000  # counted, not read from ZeRO-3's empty shards
    assert rows[(2, 2)]["params"] == r["params"] < 5_000_000  # the workers trained --model tiny itself
    assert r["dco_over_ce"] > 0 and "dco/ce step time at 2, ZeRO-2" in done.stdout
    assert "not a measurement" in done.stdout


def test_scaling_efficiency_is_per_gpu_throughput_against_the_smallest_count_that_ran():
    from jobs.bench_train import scaling_efficiency

    rows = [{"gpus": 1, "zero_stage": 2, "tokens_per_s": 100.0}, {"gpus": 8, "zero_stage": 2, "tokens_per_s": 92.0},
            {"gpus": 1, "zero_stage": 3, "error": "OutOfMemoryError"},
            {"gpus": 2, "zero_stage": 3, "tokens_per_s": 40.0}, {"gpus": 8, "zero_stage": 3, "tokens_per_s": 30.0}]
    scaling_efficiency(rows)
    assert rows[1]["scaling_efficiency"] == pytest.approx(0.92) and rows[1]["scaling_base_gpus"] == 1
    assert "scaling_efficiency" not in rows[2]  # the failed one
    assert rows[3]["scaling_efficiency"] == 1.0 and rows[4]["scaling_efficiency"] == pytest.approx(0.75)
    assert rows[4]["scaling_base_gpus"] == 2


def test_more_workers_than_the_host_has_is_refused_at_once():
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "bench", "train", "--gpus", "1,4096", "--device", "cpu",
                           "--model", "tiny"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "asks for 4096 CPU workers" in done.stdout
