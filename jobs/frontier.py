"""`passn frontier`: the pass@N frontier over trained models, from sweeps and training runs.

    passn frontier runs/sweep [runs/other-sweep runs/some-run ...] --out runs/report
    passn frontier runs/sweep --out runs/report --recommend 64

Reads each sweep's trials (their evaluation jobs' trials/*/evaluate/*/summary.json where the sweep
ran with --evaluate, else trials/*/results.jsonl), a training run's eval/epoch_*.summary.json, or
a `passn evaluate` or `passn prove` output folder (summary.json), in any mix, and
writes OUT/frontier.json ("table": per trial x epoch x k; "frontier": for each test budget N the
best trial at its last epoch), OUT/frontier.png (pass@N against N per trial, frontier drawn over
them: the paper's Figure 2a), OUT/confidence_TRIAL.png (greedy-confidence histograms per epoch:
Figure 1) and OUT/report.md with the tables. --recommend N prints the training budget N' to use
for test budget N.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import fsspec

from jobs.cluster import path_exists
from passn import results, sweeps
from passn.scratch import scratch



def evaluation_summaries(directory: str) -> list[dict[str, Any]]:
    """The summaries of evaluation jobs under ``directory``: its own summary.json (a ``passn
    evaluate`` output folder) or those of ``evaluate/*/`` (a sweep trial's), oldest step first."""
    directory = directory.rstrip("/")
    if path_exists(f"{directory}/summary.json"):
        paths = [f"{directory}/summary.json"]
    elif path_exists(f"{directory}/{sweeps.EVALUATE_DIR}"):
        fs, root = fsspec.core.url_to_fs(f"{directory}/{sweeps.EVALUATE_DIR}")
        paths = sorted(f"{directory}/{sweeps.EVALUATE_DIR}/{p.rstrip('/').rsplit('/', 1)[-1]}/summary.json"
                       for p in fs.ls(root, detail=False))
        paths = [p for p in paths if path_exists(p)]
    else:
        return []
    out = []
    for p in paths:
        with fsspec.open(p, "r") as f:
            summary = json.load(f)
        # passn prove: a summary for the model (or ensemble) and one for the baseline, each a trial
        searched = {key: summary[key] for key in ("model", "ensemble", "baseline") if isinstance(summary.get(key), dict)}
        if "provenance" not in summary and searched and all("provenance" in s for s in searched.values()):
            name = p.rsplit("/", 2)[-2]
            out += [{**s, "provenance": {**s["provenance"], "run": f"{name}/{key}"}} for key, s in searched.items()]
            continue
        if "provenance" not in summary:
            raise sweeps.SweepError(f"{p}: an evaluation summary without provenance (written before passn's one result "
                                    "schema): evaluate the checkpoint again")
        out.append(summary)
    return out


def read_results(directory: str) -> list[dict[str, Any]]:
    """Result rows of a sweep, a training run or a ``passn evaluate`` output folder.

    A sweep trial or run evaluated by evaluation jobs (``evaluate/``) is read from those; otherwise
    from its in-loop per-epoch evaluations."""
    directory = directory.rstrip("/")
    if path_exists(f"{directory}/{sweeps.SWEEP_FILE}"):
        with fsspec.open(f"{directory}/{sweeps.SWEEP_FILE}", "r") as f:
            spec = json.load(f)
        rows = []
        for trial in spec["trials"]:
            trial_dir = f"{directory}/trials/{trial['name']}"
            evaluated = evaluation_summaries(trial_dir)
            if evaluated:
                rows += [r for s in evaluated for r in results.frontier_rows(s, trial=trial["name"])]
                continue
            path = f"{trial_dir}/{sweeps.RESULTS_FILE}"
            if not path_exists(path):
                print(f"passn frontier: {directory}: trial {trial['name']} is not finished: left out", file=sys.stderr)
                continue
            with fsspec.open(path, "r") as f:
                rows += [json.loads(line) for line in f if line.strip()]
        return rows
    evaluated = evaluation_summaries(directory)
    if evaluated:
        return [r for s in evaluated for r in results.frontier_rows(s)]
    if path_exists(f"{directory}/eval") and path_exists(f"{directory}/config.yaml"):
        name = directory.rsplit("/", 1)[-1]
        summaries = sweeps.read_epoch_summaries(directory)
        if all("provenance" in s for s in summaries):
            return [r for s in summaries for r in results.frontier_rows(s, trial=name)]
        from passn.config import load_config

        cfg = load_config(f"{directory}/config.yaml", [])  # a run evaluated before the one result schema
        return sweeps.result_rows(name, cfg.objective.kind, cfg.objective.budget, cfg.seed, summaries)
    raise FileNotFoundError(f"{directory}: neither a sweep ({sweeps.SWEEP_FILE}), a training run (config.yaml and "
                            "eval/) nor an evaluation (summary.json)")


def _trial_dirs(directory: str) -> dict[str, str]:
    directory = directory.rstrip("/")
    if path_exists(f"{directory}/{sweeps.SWEEP_FILE}"):
        with fsspec.open(f"{directory}/{sweeps.SWEEP_FILE}", "r") as f:
            return {t["name"]: f"{directory}/trials/{t['name']}" for t in json.load(f)["trials"]}
    return {directory.rsplit("/", 1)[-1]: directory}


def write_report(directories: list[str], out: str, epoch: int | None = None) -> dict[str, Any]:
    from passn import checkpoint as ckpt
    from passn import plots

    rows = [r for d in directories for r in read_results(d)]
    if not rows:
        raise sweeps.SweepError("no finished results in " + ", ".join(directories))
    trials = list(dict.fromkeys(r["trial"] for r in rows))
    if len(trials) != len({(r["trial"]) for r in rows}):
        raise sweeps.SweepError("two inputs hold trials of the same name")
    front = sweeps.frontier(rows, epoch)
    report = {"table": [{k: r[k] for k in ("trial", "objective", "budget", "seed", "epoch", "k", "pass_at_k")}
                        for r in rows], "frontier": front}
    with scratch("frontier") as local:
        (local / "frontier.json").write_text(json.dumps(report, indent=1))
        (local / "report.md").write_text(f"# pass@N frontier\n\nInputs: {', '.join(directories)}\n\n"
                                         + sweeps.markdown_report(rows, front) + "\n")
        chosen = sweeps.last_epoch_rows(rows) if epoch is None else [r for r in rows if r["epoch"] == epoch]
        curves: dict[str, dict[int, float]] = {}
        for r in chosen:
            curves.setdefault(r["trial"], {})[r["k"]] = r["pass_at_k"]
        plots.plot_frontier(curves, front, str(local / "frontier.png"))
        for d in directories:
            for name, trial_dir in _trial_dirs(d).items():
                summaries = sweeps.read_epoch_summaries(trial_dir) if path_exists(f"{trial_dir}/eval") else []
                if summaries:
                    picks = sorted({0, len(summaries) // 3, 2 * len(summaries) // 3, len(summaries) - 1})
                    plots.plot_confidence_by_epoch([summaries[i] for i in picks], str(local / f"confidence_{name}.png"),
                                                   f"{name}: greedy confidence on the test set")
        ckpt.upload_tree(local, out)
    return report


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("frontier", help="the pass@N frontier over sweeps and runs: JSON, plots, markdown",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="sweep or training-run directories (local or s3://)")
    p.add_argument("--out", required=True, help="report folder (local or s3://)")
    p.add_argument("--epoch", type=int, default=None, help="compare trials at this epoch (default: each one's last)")
    p.add_argument("--recommend", type=int, metavar="N", help="print the training budget N' for test budget N")
    p.set_defaults(run=main_with_args)


def main_with_args(args: argparse.Namespace) -> int:
    try:
        report = write_report(args.dirs, args.out, args.epoch)
    except (sweeps.SweepError, FileNotFoundError) as exc:
        print(f"passn frontier: {exc}", file=sys.stderr)
        return 2
    print("  N   pass@N  N'   objective  trial")
    for f in report["frontier"]:
        print(f"{f['N']:>4}  {f['pass_at_N']:.3f}  {f['train_budget']:<4g} {f['objective']:<10} {f['trial']}")
    if args.recommend:
        best = sweeps.recommend(report["frontier"], args.recommend)
        print(f"recommendation for test budget N = {args.recommend}: train with {best['objective']} at N' = "
              f"{best['train_budget']:g} (trial {best['trial']}: pass@{best['N']} {best['pass_at_N']:.3f})")
    print(f"wrote {args.out.rstrip('/')}/frontier.json, frontier.png, confidence_*.png, report.md")
    return 0
