"""`passn evaluate (--checkpoint DIR | --endpoint URL --model ID) --out DIR`: pass@k by sampling and verifying.

For every held-out problem of the configured task: N samples, from a SamplerPool on a checkpoint
(vLLM, or transformers with --backend) or from an OpenAI-compatible server through the official
``openai`` client (`passn serve`, vLLM's own server, ...), each
verified (exact for the synthetic task, math-verify in a VerifierPool for MATH), then pass@k over
the k grid with the unbiased estimator (the paper's chunk estimator beside it), the greedy answer
with its confidence and correctness, and the most frequent answers. Writes ``problems.jsonl`` (a
line per problem, appended batch by batch: an interrupted run resumes where it stopped),
``summary.json`` and PNG plots (pass@k against k, greedy-confidence histogram and calibration).

    passn evaluate --checkpoint runs/ce/checkpoints/step_00000468 --config configs/tiny.yaml \\
        --samples 256 --out runs/ce/eval-sampled
    passn evaluate --endpoint http://127.0.0.1:8000/v1 --model ce/step_00000468 --config configs/tiny.yaml \\
        --samples 256 --out runs/ce/eval-served      # token from $PASSN_SERVE_TOKEN or --token-file
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any

import fsspec
import numpy as np

from passn import checkpoint as ckpt
from passn import coverage, results
from passn.config import ConfigError, RunConfig, load_config
from passn.deadlines import DeadlinePassed
from passn.scratch import sweep_stale
from passn.tasks import DataError, MathTask

PROBLEMS_FILE, SUMMARY_FILE = "problems.jsonl", "summary.json"


def resolve_checkpoint(checkpoint: str) -> tuple[str, dict[str, Any] | None]:
    """A checkpoint folder (verified by its manifest) or a plain Hugging Face folder -> (model
    folder, the checkpoint's manifest or None); either must hold safetensors weights."""
    from passn.models import check_safetensors_weights

    fs, root = fsspec.core.url_to_fs(checkpoint)
    if fs.exists(f"{root}/{ckpt.MANIFEST}"):
        verified = ckpt.verify_checkpoint(checkpoint)
        check_safetensors_weights(verified.model_dir)
        return verified.model_dir, verified.manifest
    if fs.exists(f"{root}/config.json"):
        check_safetensors_weights(checkpoint)
        return checkpoint, None
    raise FileNotFoundError(f"{checkpoint}: neither a passn checkpoint (manifest.json) nor a model folder (config.json)")


def resolve_model_dir(checkpoint: str) -> str:
    """The model folder of a checkpoint or of a plain Hugging Face folder (see resolve_checkpoint)."""
    return resolve_checkpoint(checkpoint)[0]


def _read_rows(out: str) -> list[dict[str, Any]]:
    """The rows an earlier evaluation into ``out`` wrote. A torn last line (a writer killed
    mid-line) is dropped, its problem evaluated again; any other unreadable line is an error
    naming the file and line."""
    path = f"{out.rstrip('/')}/{PROBLEMS_FILE}"
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        return []
    with fs.open(root, "r") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "uid" not in row:
                raise ValueError("not a problem record")
        except ValueError as exc:
            if i == len(lines) - 1:
                print(f"{path}:{n}: a torn last line, dropped (its problem is evaluated again)")
                break
            raise DataError(f"{path}:{n}: not a problem record ({exc}): move the file away to start afresh") from None
        rows.append(row)
    return rows


def _write_rows(fs, root: str, rows: list[dict[str, Any]]) -> None:
    """The whole file, replaced at once: a local file through a rename, an object store by one put."""
    target = f"{root}/{PROBLEMS_FILE}"
    if "file" not in fs.protocol:
        with fs.open(target, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return
    partial = f"{target}.partial-{os.getpid()}"
    with open(partial, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(partial, target)


def _check_unique(problems: list) -> None:
    """Problems are resumed by uid: two with one uid would be evaluated as one."""
    seen: dict[str, int] = {}
    for i, problem in enumerate(problems):
        if problem.uid in seen:
            raise DataError(f"test problems {seen[problem.uid]} and {i} share the unique_id {problem.uid!r}: "
                            "give each problem its own (an evaluation resumes by it)")
        seen[problem.uid] = i


def problem_row(uid: str, answers: list[str | None], correct: list[bool], k_grid: list[int], greedy: tuple[str, float, bool],
                top: int = 5) -> dict[str, Any]:
    """The problem's record (passn.results), with the paper's chunked estimate of its samples."""
    ks = [k for k in k_grid if k <= len(correct)]
    chunked = coverage.pass_at_k_chunked(np.array([correct]), ks)[0]
    return results.problem_record(uid, len(correct), int(sum(correct)), greedy, answers, correct, top,
                                  pass_at_k_chunked={str(k): float(v) for k, v in zip(ks, chunked)})


@dataclasses.dataclass(frozen=True)
class Source:
    """What is evaluated: a checkpoint sampled by a SamplerPool, or a model behind an
    OpenAI-compatible endpoint."""

    checkpoint: str | None = None
    endpoint: str | None = None
    model: str | None = None
    api_key: str | None = None
    samplers: int = 1
    backend: str = "vllm"
    concurrency: int = 8
    gpus_per_sampler: float | None = None  # None: the cluster's GPUs split among the samplers
    # deadlines (s): sampler actors up; one sampling unit (checkpoint) or one request with its retries
    # (endpoint); one batch of answer checks on the verifier pool. Past one: DeadlinePassed
    start_timeout_s: float = 900.0
    sample_timeout_s: float = 600.0
    verify_timeout_s: float = 600.0

    def describe(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint} if self.checkpoint else {"endpoint": self.endpoint, "model": self.model}

    def provenance(self, checkpoint: str | None, manifest: dict[str, Any] | None) -> dict[str, Any]:
        """How the evaluated weights were trained (the checkpoint's manifest) and how they were sampled."""
        out: dict[str, Any] = {"sampler": f"{self.backend} SamplerPool x {self.samplers}"
                                          f"{'' if not self.gpus_per_sampler else f' ({self.gpus_per_sampler:g} GPU each)'}"} \
            if self.checkpoint else \
            {"sampler": f"endpoint {self.endpoint}", "run": self.model, "checkpoint": self.model}
        if checkpoint is not None and manifest is not None:
            out.update(results.provenance_of_manifest(manifest, checkpoint))
        return out


def _prompt_tokenizer(source: Source, cfg: RunConfig):
    """The tokenizer whose chat template the prompts go through: the checkpoint's, or (an
    endpoint) that of the configured model."""
    from passn.models import fetch_model_folder, hf_tokenizer, load_tokenizer

    if source.checkpoint is None:
        return load_tokenizer(cfg.model)[0]
    return hf_tokenizer(fetch_model_folder(source.checkpoint, metadata_only=True))


def run_evaluation(source: Source | str, cfg: RunConfig, samples: int, out: str, batch_problems: int = 64,
                   num_samplers: int = 1, limit: int | None = None) -> dict[str, Any]:
    """Evaluate ``source`` (a Source, or a checkpoint path) on the configured task's test split."""
    from tqdm import tqdm

    from actors.verifier import VerifierPool
    from jobs.cluster import absolute_path, ray_session
    from passn.tasks import build_task

    if isinstance(source, str):
        source = Source(checkpoint=source, samplers=num_samplers)
    given = absolute_path(source.checkpoint) if source.checkpoint is not None else None
    manifest = None
    if given is not None:  # verified before anything starts
        model_dir, manifest = resolve_checkpoint(given)
        source = dataclasses.replace(source, checkpoint=model_dir)
    out = absolute_path(out)  # type: ignore[assignment]
    sweep_stale()
    task = build_task(cfg, tokenizer=_prompt_tokenizer(source, cfg))
    problems = task.problems("test")[:limit]
    _check_unique(problems)
    rows = _read_rows(out)
    done = {r["uid"] for r in rows}
    todo = [p for p in problems if p.uid not in done]
    if done:
        print(f"resuming: {len(done)} of {len(problems)} problems already evaluated in {out}")
    k_grid = [k for k in cfg.evaluation.k_grid if k <= samples] or [1]
    needs_ray = source.checkpoint is not None or isinstance(task, MathTask)
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    with ray_session() if needs_ray else contextlib.nullcontext():
        pool = verifier = None
        try:
            with _knob("--start-timeout" if source.checkpoint is not None else "--sample-timeout"):
                pool = make_sampler(source, cfg)
            verifier = VerifierPool(mode=cfg.task.answer_check, call_timeout_s=source.verify_timeout_s) \
                if isinstance(task, MathTask) else None
            bar = tqdm(total=len(problems), initial=len(done), desc="problems", unit="problem", file=sys.stdout)
            for start in range(0, len(todo), batch_problems):
                batch = todo[start : start + batch_problems]
                prompts = [task.prompt(p) for p in batch]
                with _knob("--sample-timeout"):
                    sampled, skipped = pool.generate(prompts, samples, cfg.sampling.temperature,
                                                     cfg.sampling.max_new_tokens, seed=cfg.sampling.seed + len(done) + start)
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
                        with _knob("--verify-timeout"):
                            verdicts = verifier.check_many([(a, problem.answer) for a in answers])
                    else:
                        verdicts = task.check_many([problem] * len(texts), texts)
                    ok = [v.correct for v in verdicts]
                    new_rows.append(problem_row(problem.uid, answers[:-1], ok[:-1], k_grid,
                                                (texts[-1], greedy_by[i].confidence, ok[-1])))
                rows += new_rows
                _write_rows(fs, root, rows)
                bar.update(len(batch))
            bar.close()
        finally:
            if pool is not None:
                pool.shutdown()
            if verifier is not None:
                verifier.shutdown()
    provenance = {**source.provenance(given, manifest), "verifier": f"VerifierPool ({cfg.task.answer_check})" if isinstance(
        task, MathTask) else f"in process ({cfg.task.answer_check})"}
    summary = results.summarise(rows, k_grid, provenance)
    summary.update(**source.describe(), task=task.name, temperature=cfg.sampling.temperature, finished=time.time())
    with fs.open(f"{root}/{SUMMARY_FILE}", "w") as f:
        json.dump(summary, f, indent=1)
    _write_plots(summary, out)
    return summary


@contextlib.contextmanager
def _knob(flag: str):
    """A deadline passed inside names the flag that sets it."""
    try:
        yield
    except DeadlinePassed as exc:
        exc.knob = exc.knob or flag
        raise


def make_sampler(source: Source, cfg: RunConfig):
    """A SamplerPool on the (already resolved) model folder, or an EndpointSampler on the served model."""
    if source.endpoint is not None:
        from passn.client import EndpointSampler

        return EndpointSampler(source.endpoint, source.model or "", api_key=source.api_key,
                               concurrency=source.concurrency, timeout_s=source.sample_timeout_s)
    from actors.sampler import SamplerPool, gpus_per_actor_here

    from passn.models import folder_kv_cache_floor, folder_limits

    model_dir = source.checkpoint or ""
    max_len, dtype = folder_limits(model_dir)
    local = model_dir
    if "://" in model_dir:
        from passn.models import fetch_model_folder

        local = fetch_model_folder(model_dir)
    gpus = gpus_per_actor_here(source.samplers) if source.gpus_per_sampler is None else source.gpus_per_sampler
    # small on the CPU, room for big batches on a GPU; always at least one sequence of the model's length
    kv_cache = max((4 << 30) if gpus > 0 else (64 << 20), folder_kv_cache_floor(model_dir, max_len, dtype))
    return SamplerPool(local, num_actors=source.samplers, backend=source.backend, max_model_len=max_len,
                       kv_cache_bytes=kv_cache, dtype=dtype, seed=cfg.sampling.seed, gpus_per_actor=gpus, start_timeout_s=source.start_timeout_s,
                       unit_timeout_s=source.sample_timeout_s, retry_timed_out=False)


def _write_plots(summary: dict[str, Any], out: str) -> None:
    from passn import plots
    from passn.scratch import scratch

    with scratch("plots") as local:
        curves = {"unbiased": {int(k): v for k, v in summary["pass_at_k"].items()},
                  "chunked (paper)": {int(k): v for k, v in summary.get("pass_at_k_chunked", {}).items()}}
        plots.plot_pass_at_k(curves, str(local / "pass_at_k.png"))
        plots.plot_confidence(summary["greedy"], str(local / "greedy_confidence.png"))
        ckpt.upload_tree(local, out)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="pass@k of a checkpoint or a served model, by sampling and verifying",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="a passn checkpoint folder or a Hugging Face model folder (local or s3://)")
    what.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible server, e.g. http://host:8000/v1")
    p.add_argument("--model", help="with --endpoint: the served model id")
    p.add_argument("--token-file", help="with --endpoint: file holding the API token (default: $PASSN_SERVE_TOKEN, "
                                        "then $OPENAI_API_KEY)")
    p.add_argument("--concurrency", type=int, default=8, help="with --endpoint: requests in flight")
    p.add_argument("--config", help="YAML configuration whose task, sampling and evaluation sections apply")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override (repeatable)")
    p.add_argument("--samples", type=int, default=None, help="samples per problem (default: evaluation.samples_per_problem)")
    p.add_argument("--out", required=True, help="results folder (local or s3://)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first LIMIT test problems")
    p.add_argument("--samplers", type=int, default=1, help="with --checkpoint: sampler actors")
    p.add_argument("--backend", choices=["vllm", "transformers"], default="vllm",
                   help="with --checkpoint: sampling engine (transformers where vLLM cannot run)")
    p.add_argument("--gpus-per-sampler", type=float, default=None,
                   help="with --checkpoint: GPU share of each sampler actor (default: the cluster's GPUs split "
                        "among the samplers, at most 1 each; 0 on a cluster without GPUs)")
    deadlines = p.add_argument_group("deadlines (past one, evaluate stops with exit 2, keeping every problem "
                                     "written: run it again to resume)")
    deadlines.add_argument("--sample-timeout", type=float, default=600.0, metavar="S",
                           help="seconds one sampling unit may run on a sampler actor (--checkpoint), or one "
                                "request to the endpoint may take, its retries of 429/5xx included (--endpoint); "
                                "default 600")
    deadlines.add_argument("--start-timeout", type=float, default=900.0, metavar="S",
                           help="with --checkpoint: seconds the sampler actors may take to start; default 900")
    deadlines.add_argument("--verify-timeout", type=float, default=600.0, metavar="S",
                           help="seconds one batch of answer checks may take on the verifier pool (MATH); default 600")
    p.set_defaults(run=main_with_args)


def _api_key(args: argparse.Namespace) -> str | None:
    if args.token_file:
        with open(args.token_file) as f:
            return f.read().strip()
    return os.environ.get("PASSN_SERVE_TOKEN") or os.environ.get("OPENAI_API_KEY")


def main_with_args(args: argparse.Namespace) -> int:
    import openai

    try:
        if args.endpoint and not args.model:
            raise ValueError("--endpoint needs --model ID (GET /v1/models lists the ids)")
        for flag in ("sample_timeout", "start_timeout", "verify_timeout"):
            if not getattr(args, flag) > 0:
                raise ValueError(f"--{flag.replace('_', '-')} ({getattr(args, flag)}) must be a positive number of seconds")
        cfg = load_config(args.config, args.set)
        samples = args.samples or cfg.evaluation.samples_per_problem
        source = Source(checkpoint=args.checkpoint, endpoint=args.endpoint, model=args.model, samplers=args.samplers,
                        backend=args.backend, concurrency=args.concurrency, gpus_per_sampler=args.gpus_per_sampler,
                        api_key=_api_key(args) if args.endpoint else None, start_timeout_s=args.start_timeout,
                        sample_timeout_s=args.sample_timeout, verify_timeout_s=args.verify_timeout)
        summary = run_evaluation(source, cfg, samples, args.out, limit=args.limit)
    except DeadlinePassed as exc:
        print(f"passn evaluate: {exc}; the problems evaluated so far are kept in {args.out} (run again to resume)",
              file=sys.stderr)
        return 2
    except (ConfigError, DataError, ckpt.CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"passn evaluate: {exc}", file=sys.stderr)
        return 2
    except (openai.AuthenticationError, openai.NotFoundError, openai.APIConnectionError) as exc:
        print(f"passn evaluate: {args.endpoint}: {exc}", file=sys.stderr)
        return 2
    passes = " | ".join(f"pass@{k} {v:.3f}" for k, v in summary["pass_at_k"].items())
    print(f"{summary['problems']} problems x {summary['samples_per_problem']} samples: {passes}")
    print(f"greedy accuracy {summary['greedy']['accuracy']:.3f}, mean confidence {summary['greedy']['mean_confidence']:.3f}"
          f"; results in {args.out}")
    return 0
