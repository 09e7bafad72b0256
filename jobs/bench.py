"""`passn bench`: performance measured side by side in one run (never in timed tests).

    passn bench coverage   pass@k grid (vectorised vs a per-problem loop) and verifier throughput
    passn bench train      (CUDA) passn's Ray Train + DeepSpeed path vs a plain PyTorch loop
    passn bench sample     vLLM vs transformers sampling (CPU); transformers engine vs generate (CUDA)
    passn bench prove      Coq tactics/s: one worker, the prover pool; rollouts/s with a model
    passn bench dcoa       DCOa step time with the co-located sampler pool: synchronous, staleness 1
    passn bench graders    answer checking against public graders' labelled cases: agreement per source
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from jobs.bench_output import write_result


def _best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _per_problem_loop(n: np.ndarray, c: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """The straightforward estimator (the Codex paper's numpy version), one problem and k at a time."""
    out = np.empty((len(n), len(ks)))
    for p in range(len(n)):
        for j, k in enumerate(ks):
            if n[p] - c[p] < k:
                out[p, j] = 1.0
            else:
                out[p, j] = 1.0 - np.prod(1.0 - k / np.arange(n[p] - c[p] + 1, n[p] + 1))
    return out


def bench_pass_at_k(problems: int = 500, samples: int = 4096, seed: int = 0) -> dict[str, Any]:
    from passn.coverage import pass_at_k

    rng = np.random.default_rng(seed)
    # realistic counts: many problems never solved, some always, the rest spread out
    p_true = rng.beta(0.3, 0.6, size=problems)
    n = np.full(problems, samples)
    c = rng.binomial(samples, p_true)
    ks = 2 ** np.arange(int(math.log2(samples)) + 1)
    vec_s, vec = _best_of(lambda: pass_at_k(n, c, ks), repeats=20)
    loop_s, loop = _best_of(lambda: _per_problem_loop(n, c, ks), repeats=2)
    return {
        "problems": problems, "samples_per_problem": samples, "k_grid": ks.tolist(),
        "vectorised_ms": vec_s * 1e3, "per_problem_loop_ms": loop_s * 1e3, "speedup": loop_s / vec_s,
        "max_abs_difference": float(np.abs(vec - loop).max()),
        "pass_at_k": dict(zip(map(int, ks), np.round(vec.mean(0), 4).tolist())),
    }


# -- verification throughput ---------------------------------------------------------------------


def _math_style_problem(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """A reference answer, equivalent ways to write it, and plausible wrong answers."""
    kind = rng.random()
    if kind < 0.55:  # integers: most MATH answers
        v = rng.randint(-20, 500)
        return str(v), [str(v), f"{v}.0"], [str(v + d) for d in (-2, -1, 1, 2, 10)] + [str(-v or 7)]
    if kind < 0.72:  # fractions
        a, b = rng.randint(1, 30), rng.randint(2, 31)
        g = math.gcd(a, b)
        a, b = a // g, b // g
        if b == 1:
            b = 7
        return (f"\\frac{{{a}}}{{{b}}}", [f"\\frac{{{a}}}{{{b}}}", f"\\dfrac{{{a}}}{{{b}}}", f"{a}/{b}"],
                [f"\\frac{{{a + 1}}}{{{b}}}", f"\\frac{{{b}}}{{{a}}}", f"{a}/{b + 1}", str(round(a / b, 2))])
    if kind < 0.85:  # radicals
        a, r = rng.randint(1, 9), rng.choice([2, 3, 5, 6, 7])
        return (f"{a}\\sqrt{{{r}}}", [f"{a}\\sqrt{{{r}}}", f"{a}\\sqrt {r}", f"\\sqrt{{{a * a * r}}}"],
                [f"{a + 1}\\sqrt{{{r}}}", f"{a}\\sqrt{{{r + 1}}}", f"\\sqrt{{{a * r}}}"])
    if kind < 0.93:  # expressions
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return (f"{a}x^2+{b}x", [f"{a}x^2+{b}x", f"{b}x+{a}x^2", f"x({a}x+{b})"],
                [f"{a}x^2-{b}x", f"{b}x^2+{a}x", f"{a}x+{b}"])
    a, b = rng.randint(-9, 9), rng.randint(10, 20)  # intervals and tuples
    return (f"({a},{b})", [f"({a},{b})", f"\\left({a}, {b}\\right)"], [f"[{a},{b}]", f"({a},{b + 1})", f"({b},{a})"])


def _tail_variant(answer: str, rng: random.Random) -> str:
    """A rarely sampled wrong answer of the same shape: one number in it perturbed."""
    digits = [i for i, ch in enumerate(answer) if ch.isdigit()]
    if not digits:
        return answer + "+1"
    i = rng.choice(digits)
    return answer[:i] + str(rng.randint(10, 99)) + answer[i + 1 :]


def make_predictions(total: int = 100_000, problems: int = 200, tail_share: float = 0.1,
                     tail_size: int = 30, seed: int = 0) -> list[tuple[str, str]]:
    """(prediction, reference) pairs with realistic repetition. Each problem's samples follow a
    Zipf law over a dozen common answers (right ones in several notations, typical mistakes), and
    ``tail_share`` of them come from a tail of ``tail_size`` rarer wrong answers."""
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    per_problem = total // problems
    for _ in range(problems):
        reference, right, wrong = _math_style_problem(rng)
        candidates = right + wrong
        rng.shuffle(candidates)
        weights = [1.0 / (rank + 1) ** 1.2 for rank in range(len(candidates))]
        tail = [_tail_variant(rng.choice(wrong), rng) for _ in range(tail_size)]
        for _ in range(per_problem):
            pool, w = (tail, None) if rng.random() < tail_share else (candidates, weights)
            pairs.append((rng.choices(pool, weights=w)[0], reference))
    rng.shuffle(pairs)
    return pairs


def bench_verify(total: int = 100_000, uncached_sample: int = 2_000, workers: int | None = None,
                 tail_share: float = 0.1, distinct_sample: int = 1_000) -> dict[str, Any]:
    from passn.verify import AnswerChecker

    workers = workers or max(1, min(os.cpu_count() or 1, 4))
    pairs = make_predictions(total, tail_share=tail_share)
    with AnswerChecker(workers=workers) as warm:  # start-up (imports) is not a check: exclude it
        warm.check("x", "y")
        start = time.perf_counter()
        verdicts = warm.check_many(pairs)
        cached_s = time.perf_counter() - start
        stats = warm.stats
    sample = pairs[:uncached_sample]
    with AnswerChecker(workers=workers, cache=False) as cold:
        cold.check("x", "y")
        start = time.perf_counter()
        cold_verdicts = cold.check_many(sample)
        uncached_s = time.perf_counter() - start
    agree = all(a.correct == b.correct for a, b in zip(verdicts, cold_verdicts))
    distinct = sorted(set(pairs))
    per_check_ms = _per_distinct_check_ms(random.Random(0).sample(distinct, min(distinct_sample, len(distinct))))
    return {
        "checks": total, "distinct_pairs": len(set(pairs)), "workers": workers, "tail_share": tail_share,
        "cache_on_checks_per_s": total / cached_s, "cache_on_seconds": cached_s,
        "cache_off_checks_per_s": len(sample) / uncached_s, "cache_off_sample": len(sample),
        "speedup": (total / cached_s) / (len(sample) / uncached_s),
        "accuracy_of_predictions": sum(v.correct for v in verdicts) / total,
        "cache_on_and_off_agree": agree,
        "math_verify_calls": stats.worker_checks, "numeric_fast_path": stats.numeric_hits,
        "timeouts": stats.timeouts,
        "distinct_checks_timed": len(per_check_ms),
        "per_distinct_check_ms": {q: float(np.percentile(per_check_ms, int(q[1:]))) for q in ("p50", "p95", "p99")},
    }


def _per_distinct_check_ms(pairs: list[tuple[str, str]]) -> list[float]:
    """Wall time of each check on its own (one worker, caches off): what a never-seen answer costs."""
    from passn.verify import AnswerChecker

    times = []
    with AnswerChecker(workers=1, cache=False) as checker:
        checker.check("x", "y")
        for prediction, reference in pairs:
            start = time.perf_counter()
            checker.check(prediction, reference)
            times.append((time.perf_counter() - start) * 1e3)
    return times


def _coverage_command(args: argparse.Namespace) -> int:
    print(f"pass@k: {args.problems} problems x n = {args.samples}, k in powers of two up to n ...", flush=True)
    grid = bench_pass_at_k(args.problems, args.samples)
    print(f"  vectorised {grid['vectorised_ms']:.2f} ms | per-problem loop {grid['per_problem_loop_ms']:.0f} ms"
          f" | {grid['speedup']:.0f}x | max |diff| {grid['max_abs_difference']:.1e}"
          f" | target < 50 ms: {'met' if grid['vectorised_ms'] < 50 else 'MISSED'}")
    print(f"verification: {args.checks} MATH-style predictions (tail share {args.tail_share}), cache on vs off ...",
          flush=True)
    ver = bench_verify(args.checks, args.uncached_sample, args.workers, args.tail_share, args.distinct_sample)
    print(f"  cache on {ver['cache_on_checks_per_s']:,.0f} checks/s ({ver['distinct_pairs']} distinct pairs,"
          f" {ver['math_verify_calls']} math-verify calls) | cache off {ver['cache_off_checks_per_s']:,.0f} checks/s"
          f" | {ver['speedup']:.0f}x | {ver['workers']} workers"
          f" | target >= 20k/s: {'met' if ver['cache_on_checks_per_s'] >= 20_000 else 'MISSED'}")
    q = ver["per_distinct_check_ms"]
    print(f"  one distinct check on its own ({ver['distinct_checks_timed']} pairs, one worker, caches off):"
          f" p50 {q['p50']:.2f} ms | p95 {q['p95']:.2f} ms | p99 {q['p99']:.2f} ms")
    write_result(args.out, {"pass_at_k": grid, "verify": ver, "cpus": os.cpu_count()})
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (ratios measured side by side in one run)")
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    cov = kinds.add_parser("coverage", help="pass@k grid and verifier throughput",
                           description="pass@k for PROBLEMS x SAMPLES x k (powers of two) against a "
                                       "per-problem loop, and answer checks/s with the cache on and off.")
    cov.add_argument("--problems", type=int, default=500)
    cov.add_argument("--samples", type=int, default=4096)
    cov.add_argument("--checks", type=int, default=100_000)
    cov.add_argument("--uncached-sample", type=int, default=2_000,
                     help="checks timed with the cache off (each runs math-verify)")
    cov.add_argument("--distinct-sample", type=int, default=1_000,
                     help="distinct (prediction, reference) pairs timed one at a time for the p50/p95/p99")
    cov.add_argument("--workers", type=int, default=None, help="verifier processes (default: CPUs, at most 4)")
    cov.add_argument("--tail-share", type=float, default=0.1,
                     help="share of each problem's samples drawn from 30 rare wrong answers (0: only the "
                          "dozen common answers per problem)")
    cov.add_argument("--out", help="also write the figures as JSON here")
    cov.set_defaults(run=_coverage_command)
    from jobs import bench_dcoa, bench_graders, bench_prove, bench_sample, bench_train

    bench_train.add_parser(kinds)
    bench_sample.add_parser(kinds)
    bench_prove.add_parser(kinds)
    bench_dcoa.add_parser(kinds)
    bench_graders.add_parser(kinds)
