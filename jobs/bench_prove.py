"""`passn bench prove`: Coq prover throughput, one worker and the ProverPool, and rollouts/s with a model.

Random-tactic search (the prototype's measurement): every theorem of --theorems gets --passes
rollouts of tactics drawn uniformly from a fixed list of common tactics, capped at --max-steps.
Only tactics that reach Coq count (repeats of a (state, tactic) pair are answered from the
prover's cache and are not counted). Then the same search over a ProverPool of --provers Ray
actors, and, with --checkpoint, the search with a model's sampled tactics (`passn prove`'s path).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import Any

from jobs.bench_output import write_result

# common tactics of the standard library's proofs (`passn prover extract` counts), and some that fail
TACTICS = ["intros.", "simpl.", "reflexivity.", "auto.", "split.", "assumption.", "trivial.", "intro.", "left.",
           "right.", "constructor.", "symmetry.", "f_equal.", "destruct b.", "induction n.", "intros n.",
           "tauto.", "lia.", "discriminate.", "subst.", "intuition.", "easy.", "red.", "exfalso.", "intros H.",
           "apply H.", "inversion H.", "rewrite H.", "exact I.", "destruct n."]


def random_tactics(seed: int):
    """A ``passn prove`` Sampler that draws tactics uniformly from TACTICS."""
    rng = random.Random(seed)

    def sample(plan: dict[int, list[str]]) -> tuple[dict[str, list[str]], dict[str, str]]:
        return {t: [rng.choice(TACTICS) for _ in range(count)] for count, texts in plan.items() for t in texts}, {}

    return sample


def bench_worker(theorems, passes: int, max_steps: int, seed: int = 0) -> dict[str, Any]:
    from actors.prover import CoqProver
    from passn.prover import search_sequentially

    rng = random.Random(seed)
    with CoqProver() as prover:
        prover.start(theorems[0])  # start-up (process, first context) is not a tactic: exclude it
        start = time.perf_counter()
        proved = 0
        for theorem in theorems:
            row = search_sequentially(prover, theorem, lambda text, n: [rng.choice(TACTICS) for _ in range(n)],
                                      passes, max_steps)
            proved += row["successes"] > 0
        seconds = time.perf_counter() - start
        tactics = prover.tactics
    return {"tactics": tactics, "seconds": round(seconds, 2), "tactics_per_s": tactics / seconds,
            "theorems_proved": proved}


def bench_pool(theorems, passes: int, max_steps: int, provers: int, seed: int = 0) -> dict[str, Any]:
    from actors.prover import ProverPool
    from jobs.prover import search_theorems

    pool = ProverPool(provers)
    try:
        rows: list[dict[str, Any]] = []
        start = time.perf_counter()
        search_theorems(theorems, pool, random_tactics(seed), passes, max_steps, None, rows.append)
        seconds = time.perf_counter() - start
        tactics = sum(s["tactics"] for s in pool.stats())
    finally:
        pool.shutdown()
    return {"provers": provers, "tactics": tactics, "seconds": round(seconds, 2), "tactics_per_s": tactics / seconds,
            "theorems_proved": sum(r.get("successes", 0) > 0 for r in rows)}


def bench_model(checkpoint: str, theorems, passes: int, max_steps: int, provers: int, backend: str) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    from actors.prover import ProverPool
    from jobs.prover import ProveOptions, run_model

    opts = ProveOptions(passes=passes, max_steps=max_steps, provers=provers, time_budget_s=None, backend=backend)
    pool = ProverPool(provers)
    try:
        out = Path(tempfile.mkdtemp(prefix="passn-bench-prove-"))
        (out / "results").mkdir()
        start = time.perf_counter()
        rows = run_model("bench", checkpoint, passes, theorems, pool, opts, out)
        seconds = time.perf_counter() - start
        tactics = sum(s["tactics"] for s in pool.stats())
    finally:
        pool.shutdown()
    rollouts = sum(r.get("attempts", 0) for r in rows)
    return {"rollouts": rollouts, "seconds": round(seconds, 2), "rollouts_per_s": rollouts / seconds,
            "tactics_per_s": tactics / seconds, "theorems_proved": sum(r.get("successes", 0) > 0 for r in rows),
            "note": "includes the sampler's start-up"}


def _command(args: argparse.Namespace) -> int:
    from jobs.cluster import ray_session
    from passn.prover import load_theorems

    theorems = load_theorems(args.theorems)[: args.limit]
    print(f"one worker: {len(theorems)} theorems x {args.passes} random rollouts, <= {args.max_steps} steps ...",
          flush=True)
    worker = bench_worker(theorems, args.passes, args.max_steps)
    print(f"  {worker['tactics_per_s']:,.0f} tactics/s ({worker['tactics']} tactics in {worker['seconds']} s)"
          f" | target >= 400/s per worker: {'met' if worker['tactics_per_s'] >= 400 else 'MISSED'}")
    with ray_session(num_cpus=os.cpu_count()):
        pool = bench_pool(theorems, args.passes, args.max_steps, args.provers)
        print(f"pool of {args.provers}: {pool['tactics_per_s']:,.0f} tactics/s ({pool['tactics']} tactics in "
              f"{pool['seconds']} s) | {pool['tactics_per_s'] / worker['tactics_per_s']:.2f}x one worker")
        model = None
        if args.checkpoint:
            model = bench_model(args.checkpoint, theorems, args.passes, args.max_steps, args.provers, args.backend)
            print(f"model: {model['rollouts_per_s']:.1f} rollouts/s ({model['rollouts']} rollouts in {model['seconds']} s,"
                  f" {model['tactics_per_s']:,.0f} tactics/s, {model['theorems_proved']} theorems proved)")
    result = {"worker": worker, "pool": pool, "model": model, "cpus": os.cpu_count(), "theorems": args.theorems,
              "passes": args.passes, "max_steps": args.max_steps, "backend": args.backend}
    write_result(args.out, result)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    from jobs.prover import default_backend

    p = kinds.add_parser("prove", help="Coq tactics/s (one worker, the prover pool) and rollouts/s with a model",
                         description=__doc__.split("\n\n")[1])
    p.add_argument("--theorems", default="configs/coq-theorems.jsonl", help="theorem file (JSONL)")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT theorems")
    p.add_argument("--passes", type=int, default=128, help="random rollouts per theorem (default 128)")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--provers", type=int, default=2, help="prover actors in the pool (default 2)")
    p.add_argument("--checkpoint", help="also measure rollouts/s of `passn prove` with this model")
    p.add_argument("--backend", choices=["vllm", "transformers"], default=default_backend(), help="sampling engine")
    p.add_argument("--out", help="also write the figures as JSON here")
    p.set_defaults(run=_command)
