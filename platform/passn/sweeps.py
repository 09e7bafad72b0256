"""Sweeps and frontiers (pure): grids of config overrides, trial names, result rows, the
frontier and the training budget it recommends.

    grid = parse_grid(["objective.kind=ce,dco", "objective.budget=1,16,256", "seed=0,1"])
    trials = expand(grid)                     # [{"objective.kind": "ce", ...}, ...] in grid order
    name = trial_name(trials[0])              # "kind=ce_budget=1_seed=0"
    summaries = read_epoch_summaries(run_dir) # RUN_DIR/eval/*.summary.json, oldest epoch first
    rows = result_rows(name, cfg, summaries)  # one row per epoch x k
    table = frontier(rows)                    # for each test budget N, the best trial's pass@N

A sweep directory holds ``sweep.json`` (the base config and the grid), and per trial
``trials/NAME/`` (a training run directory) with ``results.jsonl`` written when the trial is done.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import fsspec

from passn import coverage

RESULTS_FILE = "results.jsonl"
EVALUATE_DIR = "evaluate"  # trials/NAME/evaluate/step_NNNNNNNN/: evaluation jobs on the trial's checkpoints
SWEEP_FILE = "sweep.json"


class SweepError(ValueError):
    pass


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["key=v1,v2", ...]`` -> [(key, [v1, v2]), ...]; keys are the config's dotted paths."""
    grid: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",")]
        if not sep or not key.strip() or not all(items):
            raise SweepError(f"--grid {spec!r}: expected KEY=V1,V2,... (for example objective.budget=1,16,256)")
        if key.strip() in {k for k, _ in grid}:
            raise SweepError(f"--grid {spec!r}: {key.strip()} is already a grid axis")
        if len(set(items)) != len(items):
            raise SweepError(f"--grid {spec!r}: a value repeats")
        grid.append((key.strip(), items))
    return grid


def expand(grid: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, str]]:
    """Every combination, the first axis slowest."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in grid))]


def trial_name(overrides: dict[str, str]) -> str:
    """A short, path- and URL-safe name: the last part of each key (the whole key where two would clash)."""
    last = [k.rsplit(".", 1)[-1] for k in overrides]
    parts = [f"{k if last.count(short) > 1 else short}={v}" for (k, v), short in zip(overrides.items(), last)]
    return re.sub(r"[^A-Za-z0-9._=-]", "-", "_".join(parts)) or "base"


def read_epoch_summaries(run_dir: str) -> list[dict[str, Any]]:
    """A training run's per-epoch evaluation summaries (``RUN_DIR/eval/*.summary.json``, local or a
    URL), oldest epoch first."""
    fs, root = fsspec.core.url_to_fs(f"{run_dir.rstrip('/')}/eval")
    paths = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".summary.json"))
    out = []
    for p in paths:
        with fs.open(p) as f:
            out.append(json.load(f))
    return out


def result_rows(trial: str, objective: str, budget: float, seed: int,
                summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows {trial, objective, budget, seed, epoch, k, pass_at_k} from per-epoch evaluation summaries
    (``eval/epoch_NNN.summary.json`` of a training run). CE is DCO with N' = 1: its budget is 1."""
    train_budget = 1 if objective == "ce" else budget
    rows = []
    for s in summaries:
        for k, value in s["pass_at_k"].items():
            rows.append({"trial": trial, "objective": objective, "budget": train_budget, "seed": seed,
                         "epoch": s["epoch"], "k": int(k), "pass_at_k": float(value)})
    return rows


def last_epoch_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    last: dict[str, int] = {}
    for r in rows:
        last[r["trial"]] = max(last.get(r["trial"], r["epoch"]), r["epoch"])
    return [r for r in rows if r["epoch"] == last[r["trial"]]]


def frontier(rows: Sequence[dict[str, Any]], epoch: int | None = None) -> list[dict[str, Any]]:
    """For each test budget N, the trial with the highest pass@N at ``epoch`` (default: each trial's
    last): rows {N, pass_at_N, train_budget, objective, trial}."""
    chosen = last_epoch_rows(rows) if epoch is None else [r for r in rows if r["epoch"] == epoch]
    if not chosen:
        raise SweepError(f"no results{'' if epoch is None else f' at epoch {epoch}'}")
    best = coverage.pareto_frontier(chosen, value_key="pass_at_k", budget_key="k", trial_key="trial")
    return [{"N": b["N"], "pass_at_N": b["pass_at_N"], "train_budget": b["budget"], "objective": b["objective"],
             "trial": b["trial"]} for b in best]


def recommend(front: Sequence[dict[str, Any]], test_budget: int) -> dict[str, Any]:
    """The frontier row for test budget N; between measured budgets, the nearest on a log scale."""
    if test_budget < 1:
        raise SweepError("the test budget N must be >= 1")
    return min(front, key=lambda r: (abs(math.log(r["N"]) - math.log(test_budget)), -r["N"]))


def markdown_report(rows: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]]) -> str:
    """The tables of the frontier report: pass@k per trial (last epoch), the frontier, and pass@k
    per epoch for each trial."""
    ks = sorted({r["k"] for r in rows})
    last = last_epoch_rows(rows)
    trials = list(dict.fromkeys(r["trial"] for r in rows))
    value = {(r["trial"], r["epoch"], r["k"]): r["pass_at_k"] for r in rows}
    meta = {r["trial"]: r for r in rows}
    lines = ["## pass@k at each trial's last epoch", "",
             "| trial | objective | N' | seed | epoch | " + " | ".join(f"pass@{k}" for k in ks) + " |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in ks) + " |"]
    for t in trials:
        e = max(r["epoch"] for r in last if r["trial"] == t)
        m = meta[t]
        cells = [f"{value[(t, e, k)]:.3f}" if (t, e, k) in value else "" for k in ks]
        lines.append(f"| {t} | {m['objective']} | {m['budget']:g} | {m['seed']} | {e} | " + " | ".join(cells) + " |")
    lines += ["", "## Frontier: the best trial for each test budget N", "",
              "| N | pass@N | training budget N' | objective | trial |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {f['N']} | {f['pass_at_N']:.3f} | {f['train_budget']:g} | {f['objective']} | {f['trial']} |"
              for f in front]
    lines += ["", "## pass@k per epoch", ""]
    for t in trials:
        epochs = sorted({r["epoch"] for r in rows if r["trial"] == t})
        lines += [f"### {t}", "", "| epoch | " + " | ".join(f"pass@{k}" for k in ks) + " |",
                  "| --- | " + " | ".join("---" for _ in ks) + " |"]
        for e in epochs:
            lines.append(f"| {e} | " + " | ".join(f"{value[(t, e, k)]:.3f}" if (t, e, k) in value else ""
                                                  for k in ks) + " |")
        lines.append("")
    return "\n".join(lines)
