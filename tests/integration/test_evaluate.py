"""passn evaluate end to end on the synthetic task: vLLM sampling, verification, pass@k, resume, a
hung engine ended at the sampling deadline."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.sampler import HANG_ENV
from jobs.train import run_training
from passn import checkpoint as ckpt
from passn.config import load_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def test_evaluate_samples_verifies_and_resumes(tmp_path):
    run_dir = str(tmp_path / "run")
    run_training(load_config(TINY, ["task.synthetic.num_train=256", "task.synthetic.num_test=64", "optim.epochs=3",
                                    "optim.sequences_per_step=32"]), run_dir)
    checkpoint = ckpt.newest_valid_checkpoint(run_dir).path
    out = tmp_path / "eval"

    def evaluate(limit, *extra, env=None):
        return subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", "--checkpoint", checkpoint,
                               "--config", TINY, "--set", "task.synthetic.num_train=256",
                               "--set", "task.synthetic.num_test=64", "--samples", "64", "--limit", str(limit),
                               "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=env)

    first = evaluate(20)
    assert first.returncode == 0, first.stderr[-3000:]
    # the engine hangs on its first request (the actor writes the marker, then sleeps an hour)
    hang = tmp_path / "hang-marker"
    hung = evaluate(40, "--backend", "transformers", "--sample-timeout", "5",
                    env={**os.environ, HANG_ENV: str(hang)})
    ended = time.time()
    assert hung.returncode == 2, hung.stderr[-3000:]
    assert "did not answer within 5s (--sample-timeout to change)" in hung.stderr
    assert ended - hang.stat().st_mtime < 5 + 30  # the deadline, and the pool's and Ray's shutdown
    assert len((out / "problems.jsonl").read_text().splitlines()) == 20  # what was written is kept
    second = evaluate(40)  # the first 20 problems are done: only 20 more are sampled
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming: 20 of 40 problems already evaluated" in second.stdout
    rows = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and len({r["uid"] for r in rows}) == 40
    assert all(r["samples"] == 64 and 0 <= r["correct"] <= 64 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 40 and set(summary["pass_at_k"]) == {"1", "4", "16", "64"}
    values = [summary["pass_at_k"][k] for k in ("1", "4", "16", "64")]
    assert values == sorted(values)
    assert (out / "pass_at_k.png").stat().st_size > 0 and (out / "greedy_confidence.png").stat().st_size > 0
    # sampled pass@k agrees with the exact pass@k from the model's own confidences (training eval)
    exact = {json.loads(l)["uid"]: json.loads(l)["reference_logp"]
             for l in Path(run_dir, "eval/epoch_003.jsonl").read_text().splitlines()}
    for k, tolerance in ((1, 0.04), (4, 0.07)):
        want = sum(1 - (1 - math.exp(exact[r["uid"]])) ** k for r in rows) / len(rows)
        assert summary["pass_at_k"][str(k)] == pytest.approx(want, abs=tolerance)


def test_evaluate_rejects_a_folder_that_is_no_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", "--checkpoint", str(tmp_path),
                          "--config", TINY, "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "neither a passn checkpoint" in out.stderr
