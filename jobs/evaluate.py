"""`passn evaluate --checkpoint DIR --out DIR`: pass@k of a checkpoint by sampling and verifying.

For every held-out problem of the configured task: N samples from a vLLM SamplerPool, each
verified (exact for the synthetic task, math-verify in a VerifierPool for MATH), then pass@k over
the k grid with the unbiased estimator (the paper's chunk estimator beside it), the greedy answer
with its confidence and correctness, and the most frequent answers. Writes ``problems.jsonl`` (a
line per problem, appended batch by batch: an interrupted run resumes where it stopped),
``summary.json`` and PNG plots (pass@k against k, greedy-confidence histogram and calibration).

    passn evaluate --checkpoint runs/ce/checkpoints/step_00000468 --config configs/tiny.yaml \\
        --samples 256 --out runs/ce/eval-sampled
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from passn import checkpoint as ckpt
from passn import coverage
from passn.config import ConfigError, RunConfig, load_config
from passn.tasks import DataError, MathTask

PROBLEMS_FILE, SUMMARY_FILE = "problems.jsonl", "summary.json"


def resolve_model_dir(checkpoint: str) -> str:
    """A checkpoint folder (verified by its manifest) or a plain Hugging Face folder -> model folder."""
    fs, root = fsspec.core.url_to_fs(checkpoint)
    if fs.exists(f"{root}/{ckpt.MANIFEST}"):
        return ckpt.verify_checkpoint(checkpoint).model_dir
    if fs.exists(f"{root}/config.json"):
        return checkpoint
    raise FileNotFoundError(f"{checkpoint}: neither a passn checkpoint (manifest.json) nor a model folder (config.json)")


def _read_rows(out: str) -> list[dict[str, Any]]:
    fs, root = fsspec.core.url_to_fs(f"{out.rstrip('/')}/{PROBLEMS_FILE}")
    if not fs.exists(root):
        return []
    with fs.open(root, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def problem_row(uid: str, answers: list[str | None], correct: list[bool], k_grid: list[int], greedy: tuple[str, float, bool],
                top: int = 5) -> dict[str, Any]:
    n, c = len(correct), int(sum(correct))
    ks = [k for k in k_grid if k <= n]
    counts = collections.Counter(answers)
    right = {a for a, ok in zip(answers, correct) if ok}
    return {
        "uid": uid, "samples": n, "correct": c,
        "pass_at_k": {str(k): float(v) for k, v in zip(ks, coverage.pass_at_k(n, c, ks))},
        "pass_at_k_chunked": {str(k): float(v) for k, v in
                              zip(ks, coverage.pass_at_k_chunked(np.array([correct]), ks)[0])},
        "greedy_answer": greedy[0], "greedy_confidence": greedy[1], "greedy_correct": greedy[2],
        "top_answers": [[a, cnt, a in right] for a, cnt in counts.most_common(top)],
    }


def summarise(rows: list[dict[str, Any]], k_grid: list[int]) -> dict[str, Any]:
    scored = [r for r in rows if "skipped" not in r]
    ks = [k for k in k_grid if all(str(k) in r["pass_at_k"] for r in scored)]
    return {
        "problems": len(scored), "skipped": [r for r in rows if "skipped" in r],
        "samples_per_problem": scored[0]["samples"] if scored else 0,
        "pass_at_k": {str(k): float(np.mean([r["pass_at_k"][str(k)] for r in scored])) for k in ks},
        "pass_at_k_chunked": {str(k): float(np.mean([r["pass_at_k_chunked"][str(k)] for r in scored])) for k in ks},
        "greedy": coverage.confidence_summary([r["greedy_confidence"] for r in scored],
                                              [r["greedy_correct"] for r in scored]).to_dict(),
    }


def run_evaluation(checkpoint: str, cfg: RunConfig, samples: int, out: str, batch_problems: int = 64,
                   num_samplers: int = 1, limit: int | None = None) -> dict[str, Any]:
    import ray
    from tqdm import tqdm

    from actors.sampler import SamplerPool
    from actors.verifier import VerifierPool
    from jobs.train import _absolute, _runtime_env, build_task

    out = _absolute(out)  # type: ignore[assignment]
    model_dir = resolve_model_dir(checkpoint)
    task = build_task(cfg)
    problems = task.problems("test")[:limit]
    rows = _read_rows(out)
    done = {r["uid"] for r in rows}
    todo = [p for p in problems if p.uid not in done]
    if done:
        print(f"resuming: {len(done)} of {len(problems)} problems already evaluated in {out}")
    with fsspec.open(f"{model_dir}/config.json", "r") as f:
        max_len = int(json.load(f).get("max_position_embeddings", 2048))
    k_grid = [k for k in cfg.evaluation.k_grid if k <= samples] or [1]
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(include_dashboard=False, runtime_env=_runtime_env(), log_to_driver=False)
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    pool = SamplerPool(model_dir, num_actors=num_samplers, max_model_len=max_len, seed=cfg.sampling.seed)
    verifier = VerifierPool(mode=cfg.task.answer_check) if isinstance(task, MathTask) else None
    try:
        bar = tqdm(total=len(problems), initial=len(done), desc="problems", unit="problem", file=sys.stdout)
        for start in range(0, len(todo), batch_problems):
            batch = todo[start : start + batch_problems]
            prompts = [task.render_prompt(p) for p in batch]
            sampled, skipped = pool.generate(prompts, samples, cfg.sampling.temperature, cfg.sampling.max_new_tokens,
                                             seed=cfg.sampling.seed + len(done) + start)
            greedy, _ = pool.generate(prompts, 1, 0.0, cfg.sampling.max_new_tokens)
            by_prompt = collections.defaultdict(list)
            for c in sampled:
                by_prompt[c.prompt_index].append(c)
            greedy_by = {c.prompt_index: c for c in greedy}
            skipped_by = {s.prompt_index: s.reason for s in skipped}
            new_rows = []
            for i, problem in enumerate(batch):
                if i in skipped_by:
                    new_rows.append({"uid": problem.uid, "skipped": skipped_by[i]})
                    continue
                texts = [c.text for c in by_prompt[i]] + [greedy_by[i].text]
                answers = [task.extract(t) for t in texts]
                if verifier is not None:  # math-verify on Ray actors, one cache for the whole run
                    verdicts = verifier.check_many([(a, problem.answer) for a in answers])
                else:
                    verdicts = task.check_many([problem] * len(texts), texts)
                ok = [v.correct for v in verdicts]
                new_rows.append(problem_row(problem.uid, answers[:-1], ok[:-1], k_grid,
                                            (texts[-1], greedy_by[i].confidence, ok[-1])))
            rows += new_rows
            with fs.open(f"{root}/{PROBLEMS_FILE}", "w") as f:  # whole file: works on S3 too
                f.writelines(json.dumps(r) + "\n" for r in rows)
            bar.update(len(batch))
        bar.close()
    finally:
        pool.shutdown()
        if verifier is not None:
            verifier.shutdown()
        if started_here:
            ray.shutdown()
    summary = summarise(rows, k_grid)
    summary.update(checkpoint=checkpoint, model_dir=model_dir, task=task.name, temperature=cfg.sampling.temperature,
                   finished=time.time())
    with fs.open(f"{root}/{SUMMARY_FILE}", "w") as f:
        json.dump(summary, f, indent=1)
    _write_plots(summary, out)
    return summary


def _write_plots(summary: dict[str, Any], out: str) -> None:
    import tempfile

    from passn import plots

    local = Path(tempfile.mkdtemp(prefix="passn-plots-"))
    curves = {"unbiased": {int(k): v for k, v in summary["pass_at_k"].items()},
              "chunked (paper)": {int(k): v for k, v in summary["pass_at_k_chunked"].items()}}
    plots.plot_pass_at_k(curves, str(local / "pass_at_k.png"))
    plots.plot_confidence(summary["greedy"], str(local / "greedy_confidence.png"))
    ckpt.upload_tree(local, out)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="pass@k of a checkpoint by sampling (vLLM) and verifying",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a passn checkpoint folder or a Hugging Face model folder")
    p.add_argument("--config", help="YAML configuration whose task, sampling and evaluation sections apply")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override (repeatable)")
    p.add_argument("--samples", type=int, default=None, help="samples per problem (default: evaluation.samples_per_problem)")
    p.add_argument("--out", required=True, help="results folder (local or s3://)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first LIMIT test problems")
    p.add_argument("--samplers", type=int, default=1, help="sampler actors")
    p.set_defaults(run=main_with_args)


def main_with_args(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.set)
        samples = args.samples or cfg.evaluation.samples_per_problem
        summary = run_evaluation(args.checkpoint, cfg, samples, args.out, num_samplers=args.samplers, limit=args.limit)
    except (ConfigError, DataError, ckpt.CheckpointError, FileNotFoundError) as exc:
        print(f"passn evaluate: {exc}", file=sys.stderr)
        return 2
    passes = " | ".join(f"pass@{k} {v:.3f}" for k, v in summary["pass_at_k"].items())
    print(f"{summary['problems']} problems x {summary['samples_per_problem']} samples: {passes}")
    print(f"greedy accuracy {summary['greedy']['accuracy']:.3f}, mean confidence {summary['greedy']['mean_confidence']:.3f}"
          f"; results in {args.out}")
    return 0
