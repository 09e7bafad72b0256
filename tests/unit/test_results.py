"""passn.results: one problem record and one summary for every evaluation, and `passn frontier`
reading them from evaluation jobs, training runs and sweeps, mixed."""

import json
import math

import numpy as np
import pytest

from jobs.frontier import read_results, write_report
from passn import results


def test_a_sampled_summary_is_the_mean_unbiased_pass_at_k_with_provenance():
    # n = 4: c = 1 gives pass@1 1/4, pass@4 1; c = 0 gives 0; means 1/8 and 1/2; k = 8 > n is left out
    records = [results.problem_record("a", 4, 1, ("7", 0.9, True), ["7", "3", "3", None], [True, False, False, False]),
               results.problem_record("b", 4, 0, ("5", 0.2, False), ["5"] * 4, [False] * 4),
               {"uid": "c", "skipped": "prompt too long"}]
    s = results.summarise(records, [1, 4, 8], {"step": 12, "objective": "dco", "budget": 16, "extra": "x"})
    assert s["pass_at_k"] == {"1": pytest.approx(0.125), "4": pytest.approx(0.5)}
    assert s["problems"] == 2 and s["skipped"] == [records[2]] and s["samples_per_problem"] == 4
    assert s["greedy"]["accuracy"] == 0.5 and s["schema"] == results.SCHEMA
    assert s["provenance"]["step"] == 12 and s["provenance"]["budget"] == 16 and "extra" not in s["provenance"]
    assert set(s["provenance"]) == set(results.PROVENANCE_FIELDS)
    assert records[0]["top_answers"] == [["3", 2, False], ["7", 1, True], [None, 1, False]]


def test_an_exact_summary_is_the_coverage_of_the_references_probability():
    # p = 0.5 and 0.1: pass@1 = 0.3, pass@2 = (0.75 + 0.19) / 2 = 0.47
    records = [results.problem_record(u, 0, 0, ("", 0.95 if u == "a" else 0.2, u == "a"), reference_logp=math.log(p))
               for u, p in (("a", 0.5), ("b", 0.1))]
    s = results.summarise(records, [1, 2], {}, exact=True)
    assert s["pass_at_k"] == {"1": pytest.approx(0.3), "2": pytest.approx(0.47)}
    assert s["greedy"]["fraction_high_confidence"] == 0.5 and s["estimator"].startswith("exact")


def test_frontier_rows_of_a_summary_take_the_provenance():
    s = {"pass_at_k": {"1": 0.4, "64": 0.9}, "provenance": {"run": "dco-16", "objective": "dco", "budget": 16,
                                                             "seed": 3, "epoch": 2.0}}
    assert results.frontier_rows(s) == [
        {"trial": "dco-16", "objective": "dco", "budget": 16, "seed": 3, "epoch": 2, "k": 1, "pass_at_k": 0.4},
        {"trial": "dco-16", "objective": "dco", "budget": 16, "seed": 3, "epoch": 2, "k": 64, "pass_at_k": 0.9}]
    ce = {"pass_at_k": {"1": 0.5}, "provenance": {"objective": "ce", "budget": 64, "epoch": 1}}
    assert results.frontier_rows(ce, trial="base")[0]["budget"] == 1  # CE is DCO with N' = 1


def test_provenance_of_a_manifest_names_run_step_objective_and_seed():
    manifest = {"step": 40, "epoch": 2.0, "objective": {"kind": "dco", "budget": 64}, "training_fields": {"seed": 7}}
    p = results.provenance_of_manifest(manifest, "s3://b/runs/dco64/checkpoints/step_00000040")
    assert (p["run"], p["step"], p["objective"], p["budget"], p["seed"]) == ("dco64", 40, "dco", 64, 7)


def _evaluation(folder, run, objective, budget, p_correct):
    """What passn evaluate writes: problems.jsonl and summary.json (records of 16 samples)."""
    folder.mkdir(parents=True)
    records = [results.problem_record(f"q{i}", 16, int(16 * p_correct), ("1", 0.5, True)) for i in range(4)]
    summary = results.summarise(records, [1, 4, 16], {"run": run, "objective": objective, "budget": budget,
                                                       "seed": 0, "epoch": 1.0, "step": 8})
    (folder / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps(summary))
    return summary


def test_passn_frontier_reads_evaluation_jobs_and_training_runs_mixed(tmp_path):
    a = _evaluation(tmp_path / "eval-ce", "ce-run", "ce", 1, 0.75)
    _evaluation(tmp_path / "eval-dco", "dco-run", "dco", 16, 0.5)
    # a training run's in-loop evaluation in the same schema
    run = tmp_path / "dco256"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text("objective: {kind: dco, budget: 256}\n")
    loop = results.summarise([results.problem_record("q", 0, 0, ("1", 0.5, True), reference_logp=math.log(0.05))],
                             [1, 4, 16], {"run": "dco256", "objective": "dco", "budget": 256, "seed": 0}, exact=True)
    loop.update(epoch=1, step=8)
    (run / "eval" / "epoch_001.summary.json").write_text(json.dumps(loop))
    rows = read_results(str(tmp_path / "eval-ce"))
    assert [r["pass_at_k"] for r in rows] == [a["pass_at_k"][k] for k in ("1", "4", "16")]
    report = write_report([str(tmp_path / d) for d in ("eval-ce", "eval-dco", "dco256")], str(tmp_path / "report"))
    by_n = {f["N"]: f for f in report["frontier"]}
    assert by_n[1]["trial"] == "ce-run"  # pass@1 0.75 beats 0.5 and 0.05
    assert by_n[16]["trial"] in ("ce-run", "dco-run") and by_n[16]["pass_at_N"] == pytest.approx(1.0)
    assert {r["trial"] for r in report["table"]} == {"ce-run", "dco-run", "dco256"}
    assert (tmp_path / "report" / "frontier.png").stat().st_size > 0
    loop_rows = read_results(str(run))
    assert loop_rows[0]["pass_at_k"] == pytest.approx(0.05) and loop_rows[2]["pass_at_k"] == pytest.approx(
        1 - 0.95 ** 16)
    assert np.isfinite([r["pass_at_k"] for r in loop_rows]).all()


def test_a_prove_summary_is_passn_s_summary_and_the_frontier_reads_it(tmp_path):
    from jobs.prover import pass_at_k_summary, theorem_record

    rows = [{"id": "x", "attempts": 4, "successes": 1, "proof": ["auto."], "time_s": 1.0},
            {"id": "y", "attempts": 4, "successes": 0, "proof": None, "time_s": 2.0}, {"id": "z", "skipped": "bad"}]
    record = theorem_record(rows[0])
    assert (record["uid"], record["samples"], record["correct"], record["proof"]) == ("x", 4, 1, ["auto."])
    assert record["greedy_answer"] is None and record["greedy_confidence"] is None  # no greedy search
    model = pass_at_k_summary(rows, [1, 4], {"run": "step", "objective": "dco_step", "budget": 4, "seed": 0})
    baseline = pass_at_k_summary(rows[1:], [1, 4], {"run": "ce", "objective": "ce", "budget": 1, "seed": 0})
    # x: pass@1 1/4, pass@4 1; y: 0; mean over 2 theorems
    assert model["pass_at_k"] == {"1": pytest.approx(0.125), "4": pytest.approx(0.5)} and model["proved"] == 1
    assert model["skipped"] == [{"uid": "z", "skipped": "bad"}] and model["greedy"] is None
    (tmp_path / "prove").mkdir()
    (tmp_path / "prove" / "summary.json").write_text(json.dumps({"model": model, "baseline": baseline, "wall_s": 1}))
    rows_read = read_results(str(tmp_path / "prove"))
    assert {r["trial"] for r in rows_read} == {"prove/model", "prove/baseline"}
    assert {r["objective"] for r in rows_read} == {"dco_step", "ce"}
