"""`passn demo`: the paper's overconfidence effect on CPU, in a few minutes, on a local Ray cluster.

Trains the built-in tiny Llama on the synthetic direct-answer task (docs/TOY.md) twice, with CE
and with DCO at a large budget N', and prints after each epoch pass@1, pass@16 and pass@256
computed exactly from the model's confidences (MATH.md section 1) with the greedy-confidence
summary. Under CE, pass@1 rises while pass@256 falls and greedy answers become confidently wrong;
DCO keeps pass@256 high.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import fsspec

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def read_epoch_summaries(run_dir: str) -> list[dict[str, Any]]:
    fs, root = fsspec.core.url_to_fs(f"{run_dir.rstrip('/')}/eval")
    paths = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".summary.json"))
    out = []
    for p in paths:
        with fs.open(p) as f:
            out.append(json.load(f))
    return out


def format_table(name: str, summaries: list[dict[str, Any]]) -> str:
    lines = [f"{name}", "epoch  pass@1  pass@16  pass@256  greedy-acc  mean-conf  conf>0.9  conf>0.9&wrong"]
    for s in summaries:
        p, g = s["pass_at_k"], s["greedy"]
        lines.append(f"{s['epoch']:>5}  {p['1']:.3f}   {p['16']:.3f}    {p['256']:.3f}     {g['accuracy']:.3f}"
                     f"       {g['mean_confidence']:.3f}      {g['fraction_high_confidence']:.3f}     "
                     f"{g['fraction_high_confidence_wrong']:.3f}")
    return "\n".join(lines)


def run_demo(out: str, seed: int, epochs: int, budget: int, config: str = str(DEFAULT_CONFIG),
             extra: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    import ray

    from jobs.train import _runtime_env, run_training
    from passn.config import load_config

    runs = {
        "ce": ["objective.kind=ce"],
        f"dco{budget}": ["objective.kind=dco", f"objective.budget={budget}", "objective.refill_threshold=0.01"],
    }
    common = [f"seed={seed}", f"task.seed={seed}", f"optim.epochs={epochs}", *(extra or [])]
    ray.init(include_dashboard=False, runtime_env=_runtime_env(), num_cpus=max(2, os.cpu_count() or 2))
    results = {}
    try:
        for name, overrides in runs.items():
            run_dir = f"{out.rstrip('/')}/seed{seed}/{name}"
            print(f"\n=== training {name} into {run_dir} ===", flush=True)
            run_training(load_config(config, common + overrides), run_dir)
            results[name] = read_epoch_summaries(run_dir)
    finally:
        ray.shutdown()
    return results


def main_with_args(args: argparse.Namespace) -> int:
    results = run_demo(args.out, args.seed, args.epochs, args.budget)
    print()
    for name, summaries in results.items():
        print(format_table(f"{name} (test set, exact from confidences)", summaries))
        print()
    ce = results["ce"]
    peak = max(ce, key=lambda s: s["pass_at_k"]["256"])
    last = ce[-1]
    print(f"CE: from epoch {peak['epoch']} (best pass@256) to epoch {last['epoch']}, pass@1 "
          f"{peak['pass_at_k']['1']:.3f} -> {last['pass_at_k']['1']:.3f} while pass@256 "
          f"{peak['pass_at_k']['256']:.3f} -> {last['pass_at_k']['256']:.3f}; at the end "
          f"{last['greedy']['fraction_high_confidence_wrong']:.1%} of test problems get a wrong greedy answer "
          "with confidence above 0.9")
    dco_name = next(n for n in results if n != "ce")
    dco_last = results[dco_name][-1]
    print(f"{dco_name} at epoch {dco_last['epoch']}: pass@1 {dco_last['pass_at_k']['1']:.3f}, "
          f"pass@256 {dco_last['pass_at_k']['256']:.3f}; greedy confidence above 0.9 on "
          f"{dco_last['greedy']['fraction_high_confidence']:.1%} of test problems")
    print(f"\nrun directories, checkpoints, metrics and TensorBoard events: {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="CE vs DCO on the built-in task: the overconfidence effect on CPU",
                          description=__doc__.split("\n\n")[1])
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo", help="where the two runs go (local or s3://)")
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--budget", type=int, default=256, help="DCO's training budget N'")
    demo.set_defaults(run=main_with_args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="passn demo")
    add_parser(parser.add_subparsers(dest="command", required=True))
    sys.exit(main_with_args(parser.parse_args(["demo", *sys.argv[1:]])))
