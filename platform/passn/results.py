"""One result schema for pass@N, from a checkpoint to the frontier.

Every evaluation passn runs (the per-epoch evaluation inside training, ``passn evaluate`` on a
checkpoint or an endpoint, ``passn prove``: a theorem is a problem, a rollout a sample) writes the
same two things:

- one **problem record** per held-out problem (a JSON line): ``uid``, ``samples`` n, ``correct`` c,
  ``greedy_answer``, ``greedy_confidence``, ``greedy_correct``, ``top_answers`` ([answer, count,
  verified] most frequent first), and optional extras (``reference_logp`` where the correct answer
  is one string and pass@k is exact; ``pass_at_k_chunked`` per problem; ``skipped`` with a reason);
- one **summary**: pass@k over the k grid by the unbiased estimator from (n, c) (or exactly, from
  ``reference_logp``, when nothing was sampled), the paper's chunked estimate beside it, the greedy
  confidence summary, and the ``provenance``: checkpoint, step, epoch, objective, N', seed,
  sampler, verifier.

:func:`frontier_rows` turns any summary into the rows ``passn frontier`` compares.

    record = problem_record("p1", samples=64, correct=9, greedy=("42", 0.71, True))
    summary = summarise([record, ...], k_grid=[1, 4, 16, 64], provenance={"step": 468, ...})
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import numpy as np

from passn import coverage

SCHEMA = 1
PROVENANCE_FIELDS = ("run", "checkpoint", "step", "epoch", "objective", "budget", "seed", "sampler", "verifier")


def problem_record(uid: str, samples: int, correct: int, greedy: tuple[str | None, float, bool] | None,
                   answers: Sequence[str | None] = (), verdicts: Sequence[bool] = (), top: int = 5,
                   **extra: Any) -> dict[str, Any]:
    """The record of one problem: n samples, c verified, the greedy answer (text, confidence,
    verified; None where there is no greedy answer, as in proof search) and the ``top`` most
    frequent sampled answers with their counts."""
    counts = collections.Counter(answers)
    right = {a for a, ok in zip(answers, verdicts) if ok}
    text, confidence, ok = greedy if greedy is not None else (None, None, None)
    return {"uid": uid, "samples": int(samples), "correct": int(correct), "greedy_answer": text,
            "greedy_confidence": None if confidence is None else float(confidence),
            "greedy_correct": None if ok is None else bool(ok),
            "top_answers": [[a, cnt, a in right] for a, cnt in counts.most_common(top)], **extra}


def summarise(records: Sequence[dict[str, Any]], k_grid: Sequence[int], provenance: dict[str, Any],
              exact: bool = False) -> dict[str, Any]:
    """The summary of problem records.

    Sampled (``exact`` False): mean unbiased pass@k = 1 - C(n - c, k) / C(n, k) over problems, for
    every k of the grid that no problem's n is below; with the chunked estimate of each record
    that has one. Exact: mean 1 - (1 - p)^k with p = exp(reference_logp), the direct-answer task's
    exact coverage (MATH.md section 1); its records may also carry samples."""
    scored = [r for r in records if "skipped" not in r]
    out: dict[str, Any] = {"schema": SCHEMA, "problems": len(scored), "skipped": [r for r in records if "skipped" in r],
                           "samples_per_problem": min((r["samples"] for r in scored), default=0)}
    if exact:
        logp = np.minimum(np.array([r["reference_logp"] for r in scored]), 0.0)
        values = coverage.exact_coverage_from_logp(logp, list(k_grid)).mean(0) if scored else np.zeros(len(k_grid))
        out["pass_at_k"] = {str(k): float(v) for k, v in zip(k_grid, values)}
        out["estimator"] = "exact, from the reference's probability"
    else:
        ks = [k for k in k_grid if k <= out["samples_per_problem"]]
        n = np.array([r["samples"] for r in scored])
        c = np.array([r["correct"] for r in scored])
        values = coverage.pass_at_k(n, c, ks).mean(0) if scored and ks else np.zeros(len(ks))
        out["pass_at_k"] = {str(k): float(v) for k, v in zip(ks, values)}
        out["estimator"] = "unbiased, from sampled completions"
        if scored and all("pass_at_k_chunked" in r for r in scored):
            out["pass_at_k_chunked"] = {str(k): float(np.mean([r["pass_at_k_chunked"][str(k)] for r in scored]))
                                        for k in ks}
    greedy = [r for r in scored if r["greedy_confidence"] is not None]
    out["greedy"] = coverage.confidence_summary([r["greedy_confidence"] for r in greedy],
                                                [r["greedy_correct"] for r in greedy]).to_dict() if greedy else None
    out["provenance"] = {key: provenance.get(key) for key in PROVENANCE_FIELDS}
    return out


def provenance_of_manifest(manifest: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """What a checkpoint's manifest says about how its weights were trained."""
    objective = manifest.get("objective") or {}
    fields = manifest.get("training_fields") or {}
    run = checkpoint.rstrip("/").rsplit("/checkpoints/", 1)[0].rsplit("/", 1)[-1] if "/checkpoints/" in checkpoint \
        else checkpoint.rstrip("/").rsplit("/", 1)[-1]
    return {"run": run, "checkpoint": checkpoint, "step": manifest.get("step"), "epoch": manifest.get("epoch"),
            "objective": objective.get("kind"), "budget": objective.get("budget"), "seed": fields.get("seed")}


def frontier_rows(summary: dict[str, Any], trial: str | None = None) -> list[dict[str, Any]]:
    """Rows {trial, objective, budget, seed, epoch, k, pass_at_k} of one summary for ``passn
    frontier``. CE is DCO with N' = 1: its budget is 1. The epoch is rounded to a whole epoch
    (a checkpoint at an epoch end)."""
    p = summary.get("provenance") or {}
    objective = p.get("objective") or "unknown"
    budget = 1 if objective == "ce" else p.get("budget")
    epoch = summary.get("epoch", p.get("epoch"))
    name = trial or p.get("run") or "evaluated"
    return [{"trial": name, "objective": objective, "budget": budget, "seed": p.get("seed"),
             "epoch": int(round(epoch)) if epoch is not None else 0, "k": int(k), "pass_at_k": float(v)}
            for k, v in summary["pass_at_k"].items()]
