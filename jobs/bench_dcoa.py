"""`passn bench dcoa`: DCOa's step time with the co-located sampler pool, synchronous and with
staleness 1, against its sampling and training times measured alone, in one run.

Two `passn train` runs of configs/tiny-dcoa.yaml on the embedded local cluster, one training
worker and one sampler actor beside it (no CE warm-up, no drops: the refill threshold is 0, so
every step samples exactly one window):

- staleness 0: sample the step's candidates, then train; its per-step ``sample_s`` and
  ``train_s`` are each measured alone, and its step time should be about their sum;
- staleness 1: the pool samples step t+1's candidates while the trainer runs step t; target: a
  step time at most 1.1x the larger of the two times measured alone.

Medians over the steps after the first two (the first creates the pool).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from jobs.bench_output import write_result

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny-dcoa.yaml")


def _run(staleness: int, args: argparse.Namespace) -> dict[str, float]:
    from jobs.train import run_training
    from passn.config import load_config

    per_step = args.sequences
    overrides = [f"objective.staleness={staleness}", "objective.ce_warmup_steps=0", "objective.refill_threshold=0",
                 f"objective.mc_samples={args.samples}", "resources.num_workers=1", "resources.cpus_per_worker=1",
                 "resources.sampler_actors=1", "resources.sampler_cpus=1", f"resources.sampler_backend={args.backend}",
                 f"optim.sequences_per_step={per_step}", f"optim.micro_sequences_per_worker={per_step}",
                 f"task.synthetic.num_train={per_step * args.steps}", "task.synthetic.num_test=16", "optim.epochs=1",
                 "evaluation.samples_per_problem=16", "evaluation.k_grid=[1,16]",
                 f"model.tiny.hidden_size={args.hidden}", f"model.tiny.intermediate_size={4 * args.hidden}",
                 f"model.tiny.num_layers={args.layers}", f"model.tiny.num_heads={args.hidden // 32}"]
    if args.device == "cuda" and args.layout == "colocated":  # the trainer and its sampler share one GPU
        overrides += ["resources.gpus_per_worker=0.5", "resources.sampler_gpu_fraction=0.4", "model.dtype=bfloat16"]
    elif args.device == "cuda":  # each on a GPU of its own, the weights broadcast over NCCL
        overrides += ["resources.gpus_per_worker=1", "resources.sampler_gpu=ray", "resources.sampler_gpu_fraction=1",
                      "model.dtype=bfloat16"]
    rows = run_training(load_config(CONFIG, overrides), tempfile.mkdtemp(prefix=f"passn-bench-dcoa-{staleness}-"))
    timed = rows[2:]
    if not timed:
        raise ValueError("too few steps to time: raise --steps")

    def median(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in timed)

    return {"step_s": median("step_s"), "sample_s": median("sample_s"), "train_s": median("train_s"),
            "sync_s": median("sync_s"), "sample_overlapped_s": median("sample_overlapped_s"),
            "sampled_tokens": median("sampled_tokens"), "steps_timed": len(timed)}


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("passn bench dcoa --device cuda: torch sees no CUDA device here")
        if args.layout == "disaggregated" and torch.cuda.device_count() < 2:
            raise SystemExit("passn bench dcoa --layout disaggregated: needs two GPUs (the trainer's and its "
                             f"sampler's); torch sees {torch.cuda.device_count()}")
    elif args.layout == "disaggregated":
        raise SystemExit("passn bench dcoa --layout disaggregated: GPUs only (--device cuda)")
    sync = _run(0, args)
    overlapped = _run(1, args)
    alone_sum = sync["sample_s"] + sync["train_s"]
    alone_max = max(sync["sample_s"], sync["train_s"])
    result: dict[str, Any] = {
        "staleness_0": sync, "staleness_1": overlapped,
        "staleness_0_step_over_sum": sync["step_s"] / alone_sum,
        "staleness_1_step_over_max": overlapped["step_s"] / alone_max,
        "setup": {"sequences_per_step": args.sequences, "mc_samples": args.samples, "hidden": args.hidden,
                  "layers": args.layers, "backend": args.backend, "device": args.device, "layout": args.layout},
    }
    print(f"\nDCOa on {args.device} ({args.layout}), 1 training worker + 1 {args.backend} sampler actor, "
          f"{args.sequences} candidates a step x "
          f"{args.samples} samples, tiny Llama hidden {args.hidden} x {args.layers} layers")
    print(f"  alone (staleness 0's parts): sampling {sync['sample_s']:.3f} s, training {sync['train_s']:.3f} s, "
          f"weight push {sync['sync_s']:.3f} s")
    print(f"  staleness 0: {sync['step_s']:.3f} s/step = {result['staleness_0_step_over_sum']:.2f}x "
          f"(sampling + training)")
    print(f"  staleness 1: {overlapped['step_s']:.3f} s/step = {result['staleness_1_step_over_max']:.2f}x "
          f"max(sampling, training) (target <= 1.1x: "
          f"{'met' if result['staleness_1_step_over_max'] <= 1.1 else 'MISSED'}); "
          f"{overlapped['sample_overlapped_s']:.3f} s of sampling ran beside training")
    write_result(args.out, result)
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("dcoa", help="DCOa step time with the co-located sampler pool: synchronous, "
                                      "staleness 1, and its parts alone (CPU or one GPU)",
                         description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="steps per run (one epoch)")
    p.add_argument("--sequences", type=int, default=64, help="candidates (sequences) a step")
    p.add_argument("--samples", type=int, default=16, help="Monte Carlo samples per candidate (k)")
    p.add_argument("--hidden", type=int, default=256, help="the tiny model's hidden size (a multiple of 32)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--backend", choices=["vllm", "transformers"], default="vllm")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the training worker and its sampler actor share one GPU (bf16)")
    p.add_argument("--layout", choices=["colocated", "disaggregated"], default="colocated",
                   help="cuda: the sampler on the trainer's GPU (weights by CUDA IPC), or on a second GPU "
                        "(weights broadcast over NCCL; needs two GPUs)")
    p.add_argument("--out", help="also write the figures as JSON here")
    p.set_defaults(run=run)
