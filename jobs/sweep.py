"""`passn sweep`: a grid of training runs as a Ray Tune experiment, with pass@k after every epoch.

    passn sweep configs/tiny.yaml --run-dir runs/sweep --grid objective.kind=ce,dco \\
        --grid objective.budget=1,4,16,64,256 --grid seed=0,1
    passn sweep --resume runs/sweep          # finish an interrupted sweep
    passn frontier runs/sweep --out runs/sweep/report
    passn sweep configs/tiny.yaml --run-dir runs/sweep --grid objective.budget=1,16,256 \
        --evaluate --evaluate-samples 1024    # each trial's final checkpoint by an evaluation job

Each trial trains with Ray Train inside its Tune trial (`passn train` into RUN_DIR/trials/NAME) and
evaluates after every epoch (evaluation.every_epochs): exact coverage for direct-answer tasks,
evaluation.samples_per_problem sampled completions checked by the task's verifier otherwise; its
per epoch x k results go
to RUN_DIR/trials/NAME/results.jsonl when it finishes. Trials run as many at a time as the
cluster's CPUs and GPUs allow. A failed trial is retried (--max-failures) and resumes from its
newest checkpoint; --resume skips finished trials and resumes unfinished ones the same way.
A grid field a trial's objective ignores (CE's N', DCO's group_size) takes its default there, and
a fixed --set of such a field is left out of that trial; trials that then differ in nothing are run once.

With --evaluate, once the trials are trained, each trial's final checkpoint (or, with
--evaluate-checkpoints epochs, every epoch-end checkpoint) is evaluated by the evaluation job
(`passn evaluate`: a SamplerPool, vLLM by default, and the task's verifier) at --evaluate-samples
samples per problem, into RUN_DIR/trials/NAME/evaluate/step_NNNNNNNN/; `passn frontier` then
builds the frontier from those results instead of the in-loop ones, which stay the cheap
per-epoch signal. The evaluation options are part of the sweep: --resume finishes them too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import fsspec

from passn import results, sweeps
from passn.config import (ConfigError, ObjectiveConfig, config_hash, load_config, load_config_text,
                          objective_field_applies)
from passn.scratch import scratch


def ignored_by(kind: str, field: str) -> str | None:
    """The default, as an override value, of ``objective.<x>`` when objective ``kind`` ignores it
    (it cannot be set there); None for any field that applies."""
    name = field.strip().removeprefix("objective.")
    if not field.strip().startswith("objective.") or objective_field_applies(name, kind):
        return None
    return str(ObjectiveConfig.model_fields[name].default).lower()  # YAML: true/false


def plan(config: str | None, grid_specs: list[str], overrides: list[str]) -> dict[str, Any]:
    """The sweep's spec: base config (as YAML text, so that the sweep does not depend on the file
    later), fixed overrides, and the trials, each validated now (an error names the trial)."""
    from jobs.train import absolute_path_overrides

    grid = sweeps.parse_grid(grid_specs)
    text = None
    if config:
        with fsspec.open(config, "r") as f:
            text = f.read()
    trials, seen = [], {}
    for combo in sweeps.expand(grid):
        asked = sweeps.trial_name(combo)
        kind = combo.get("objective.kind")
        if kind is not None:  # a grid field this trial's objective ignores (CE's N') takes its default
            combo = {k: v if ignored_by(kind, k) is None else ignored_by(kind, k) for k, v in combo.items()}
        name = sweeps.trial_name(combo)
        fixed = overrides if kind is None else [o for o in overrides if ignored_by(kind, o.split("=", 1)[0]) is None]
        sets = [*fixed, *(f"{k}={v}" for k, v in combo.items())]
        try:
            cfg = load_config(config, sets)
            # relative paths name files where the sweep is planned, not in Tune's trial directories
            pinned = absolute_path_overrides(cfg)
            if pinned:
                sets += pinned
                cfg = load_config(config, sets)
        except ConfigError as exc:
            raise ConfigError(f"trial {name}: {exc}") from None
        digest = config_hash(cfg)
        if digest in seen:
            print(f"sweep: {asked} trains the same configuration as {seen[digest]}: run once", flush=True)
            continue
        seen[digest] = name
        trials.append({"name": name, "overrides": sets})
    return {"config_text": text, "config": config, "grid": grid, "overrides": overrides, "trials": trials}


def _read_json(path: str) -> Any:
    with fsspec.open(path, "r") as f:
        return json.load(f)


def trial_config(spec: dict[str, Any], trial: dict[str, Any]):
    if spec["config_text"] is None:
        return load_config(None, trial["overrides"])
    return load_config_text(spec["config_text"], trial["overrides"], source=spec["config"])


def run_trial(spec: dict[str, Any], trial: dict[str, Any], run_dir: str) -> list[dict[str, Any]]:
    """Train one trial (resuming from its checkpoints if any) and write its results file."""
    from jobs.train import run_training

    cfg = trial_config(spec, trial)
    trial_dir = f"{run_dir}/trials/{trial['name']}"
    run_training(cfg, trial_dir)
    rows = [r for summary in sweeps.read_epoch_summaries(trial_dir)
            for r in results.frontier_rows(summary, trial=trial["name"])]
    with fsspec.open(f"{trial_dir}/{sweeps.RESULTS_FILE}", "w") as f:  # written last: the trial's done marker
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def evaluation_checkpoints(trial_dir: str, which: str) -> list[str]:
    """The trial's checkpoints to evaluate: the newest valid one ("final"), or every valid epoch-end one."""
    from passn import checkpoint as ckpt

    if which == "final":
        newest = ckpt.newest_valid_checkpoint(trial_dir, warn=lambda *a, **k: None, hashes=False)
        return [] if newest is None else [newest.path]
    out = []
    for path in reversed(ckpt.list_checkpoints(trial_dir)):  # oldest first
        try:
            if ckpt.verify_checkpoint(path, hashes=False).manifest.get("epoch_end"):
                out.append(path)
        except ckpt.CheckpointError as exc:
            print(f"sweep: {path}: {exc}: not evaluated", flush=True)
    return out


def evaluate_trials(spec: dict[str, Any], run_dir: str) -> None:
    """Evaluate the chosen checkpoints of every trial with the evaluation job (``spec["evaluate"]``);
    an evaluation already finished (its summary.json) is skipped, an interrupted one resumes."""
    from jobs.cluster import path_exists, ray_session
    from jobs.evaluate import Source, run_evaluation

    options = spec["evaluate"]
    with ray_session():
        for trial in spec["trials"]:
            trial_dir = f"{run_dir}/trials/{trial['name']}"
            cfg = trial_config(spec, trial)
            for path in evaluation_checkpoints(trial_dir, options["checkpoints"]):
                out = f"{trial_dir}/{sweeps.EVALUATE_DIR}/{path.rstrip('/').rsplit('/', 1)[-1]}"
                if path_exists(f"{out}/summary.json"):
                    continue
                print(f"sweep: evaluating {trial['name']} {path.rsplit('/', 1)[-1]} with {options['samples']} "
                      f"samples per problem ({options['backend']})", flush=True)
                summary = run_evaluation(Source(checkpoint=path, backend=options["backend"],
                                                samplers=options["samplers"]), cfg, options["samples"], out)
                passes = " ".join(f"pass@{k} {v:.3f}" for k, v in summary["pass_at_k"].items())
                print(f"sweep: {trial['name']}: {passes}", flush=True)


def _tune_trial(config: dict[str, Any]) -> None:
    from ray import tune

    rows = run_trial(config["spec"], config["trial"], config["run_dir"])
    last = sweeps.last_epoch_rows(rows)
    tune.report({f"pass_at_{r['k']}": r["pass_at_k"] for r in last} | {"epochs": max(r["epoch"] for r in rows)})


class _Progress:
    """Trials done / running / failed / pending with an ETA, one line per change."""

    def __init__(self, total: int, skipped: int, concurrency: int) -> None:
        self.total, self.done, self.failed, self.running = total, skipped, 0, 0
        self.concurrency, self.durations, self.started = concurrency, [], {}

    def line(self) -> str:
        pending = self.total - self.done - self.failed - self.running
        eta = ""
        if self.durations:
            mean = sum(self.durations) / len(self.durations)
            eta = f" | ETA {_fmt(mean * math.ceil((pending + self.running) / self.concurrency))}"
        return (f"sweep: {self.done}/{self.total} done, {self.running} running, {pending} pending"
                f"{f', {self.failed} failed' if self.failed else ''}{eta}")

    def callback(self):
        from ray.tune import Callback

        progress = self

        class Reporter(Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                progress.running += 1
                progress.started[trial.trial_id] = time.time()
                print(progress.line(), flush=True)

            def on_trial_complete(self, iteration, trials, trial, **info):
                progress.running -= 1
                progress.done += 1
                progress.durations.append(time.time() - progress.started.get(trial.trial_id, time.time()))
                print(f"sweep: trial {trial.config['trial']['name']} finished", flush=True)
                print(progress.line(), flush=True)

            def on_trial_error(self, iteration, trials, trial, **info):
                progress.running -= 1
                progress.failed += 1
                print(f"sweep: trial {trial.config['trial']['name']} FAILED (retries exhausted)", flush=True)
                print(progress.line(), flush=True)

        return Reporter()


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def run_sweep(spec: dict[str, Any], run_dir: str, max_failures: int = 2, address: str | None = None,
              resume: bool = False) -> dict[str, Any]:
    """Run the trials of ``spec`` not yet finished in ``run_dir``; returns {trial: rows}."""
    import ray
    from ray import tune

    from jobs.cluster import absolute_path, path_exists, ray_session

    run_dir = str(absolute_path(run_dir)).rstrip("/")
    spec_path = f"{run_dir}/{sweeps.SWEEP_FILE}"
    if path_exists(spec_path):
        stored = _read_json(spec_path)
        if not resume and stored["trials"] != spec["trials"]:
            raise sweeps.SweepError(f"{run_dir} holds a different sweep: resume it with passn sweep --resume {run_dir}"
                                    " or choose another --run-dir")
        spec = stored
    else:
        fs, root = fsspec.core.url_to_fs(run_dir)
        fs.makedirs(root, exist_ok=True)
        with fsspec.open(spec_path, "w") as f:
            json.dump(spec, f, indent=1)
    finished = {t["name"] for t in spec["trials"]
                if path_exists(f"{run_dir}/trials/{t['name']}/{sweeps.RESULTS_FILE}")}
    todo = [t for t in spec["trials"] if t["name"] not in finished]
    print(f"sweep: {len(spec['trials'])} trials in {run_dir}; {len(finished)} already finished"
          f"{' (skipped)' if finished else ''}, {len(todo)} to run", flush=True)
    if todo:
        from jobs.train import cpus_per_run, local_cpus

        configs = [trial_config(spec, t) for t in todo]
        for field in ("train_path", "test_path"):  # before any trial starts: Tune would retry each in vain
            missing = sorted({p for c in configs if (p := getattr(c.task, field)) and not path_exists(p)})
            if missing:
                raise sweeps.SweepError(f"task.{field}: {missing[0]}: no such file")
        # a trial's CPUs and GPUs: its workers', and its samplers' (their CPUs; their GPU share
        # where they sit on the workers' GPUs): a trial must not start where its samplers cannot;
        # a local cluster is made large enough for one trial (Ray's CPUs are a count, not a pinning)
        per_cpu = max(cpus_per_run(c) for c in configs)
        with scratch("tune") as storage, ray_session(address, num_cpus=max(local_cpus(c) for c in configs)):
            total = ray.cluster_resources()
            per_gpu = max(c.resources.num_workers * c.gpus_per_training_worker() for c in configs)
            concurrency = max(1, min(int(total.get("CPU", 1) // per_cpu),
                                     int(total.get("GPU", 0) // per_gpu) if per_gpu else len(todo), len(todo)))
            progress = _Progress(len(spec["trials"]), len(finished), concurrency)
            print(f"sweep: {concurrency} trial(s) at a time ({per_cpu:g} CPU{f', {per_gpu:g} GPU' if per_gpu else ''}"
                  f" each; the cluster has {total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU)", flush=True)
            tuner = tune.Tuner(
                # the trial only drives its Ray Train run, which asks for the CPUs and GPUs itself
                tune.with_resources(_tune_trial, {"cpu": 0, "memory": 1 << 20}),
                param_space={"spec": spec, "run_dir": run_dir, "trial": tune.grid_search(todo)},
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=False),
                run_config=tune.RunConfig(name="sweep", storage_path=str(storage),
                                          failure_config=tune.FailureConfig(max_failures=max_failures),
                                          callbacks=[progress.callback()], verbose=0),
            )
            grid = tuner.fit()
            errors = [r.error for r in grid if r.error]
        if errors:
            raise RuntimeError(f"{len(errors)} trial(s) failed after {max_failures} retries; the first: {errors[0]}")
    if spec.get("evaluate"):
        evaluate_trials(spec, run_dir)
    from jobs.frontier import read_results

    out: dict[str, list[dict[str, Any]]] = {}
    for row in read_results(run_dir):
        out.setdefault(row["trial"], []).append(row)
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="a grid of training runs (Ray Tune), pass@k after every epoch",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML configuration (local or s3://); omit with --resume")
    p.add_argument("--run-dir", help="where the sweep goes (local or s3://)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a grid axis over a dotted config path (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed override (repeatable)")
    p.add_argument("--resume", metavar="DIR", help="finish the sweep in DIR (finished trials are skipped)")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial (from its checkpoint)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    e = p.add_argument_group("evaluation jobs", "evaluate the trained checkpoints with passn evaluate")
    e.add_argument("--evaluate", action="store_true", help="after training, evaluate each trial's checkpoints")
    e.add_argument("--evaluate-samples", type=int, default=1024, metavar="N", help="samples per problem (default 1024)")
    e.add_argument("--evaluate-checkpoints", choices=["final", "epochs"], default="final",
                   help="the final checkpoint (default) or every epoch-end checkpoint")
    e.add_argument("--evaluate-backend", choices=["vllm", "transformers"], default="vllm", help="sampling engine")
    e.add_argument("--evaluate-samplers", type=int, default=1, metavar="K", help="sampler actors per evaluation")
    p.set_defaults(run=main_with_args)


def main_with_args(args: argparse.Namespace) -> int:
    try:
        if args.resume:
            run_dir = args.resume
            spec = _read_json(f"{run_dir.rstrip('/')}/{sweeps.SWEEP_FILE}")
        else:
            if not args.run_dir or not args.grid:
                raise sweeps.SweepError("give --run-dir and at least one --grid (or --resume DIR)")
            run_dir = args.run_dir
            spec = plan(args.config, args.grid, args.set)
            if args.evaluate:
                if args.evaluate_samples < 1:
                    raise sweeps.SweepError(f"--evaluate-samples ({args.evaluate_samples}) must be at least 1")
                spec["evaluate"] = {"samples": args.evaluate_samples, "checkpoints": args.evaluate_checkpoints,
                                    "backend": args.evaluate_backend, "samplers": args.evaluate_samplers}
        results = run_sweep(spec, run_dir, args.max_failures, args.address, resume=bool(args.resume))
    except (ConfigError, sweeps.SweepError, FileNotFoundError) as exc:
        print(f"passn sweep: {exc}", file=sys.stderr)
        return 2
    front = sweeps.frontier([r for rows in results.values() for r in rows])
    source = "evaluation jobs" if spec.get("evaluate") else "in-loop evaluation"
    print(f"frontier (each trial's last epoch, from the {source}):")
    for f in front:
        print(f"  N = {f['N']:>5}: pass@N {f['pass_at_N']:.3f} with {f['objective']} N' = {f['train_budget']:g}"
              f" ({f['trial']})")
    print(f"results: {run_dir.rstrip('/')}/trials/*/{sweeps.RESULTS_FILE}; report: passn frontier {run_dir} --out DIR")
    return 0
