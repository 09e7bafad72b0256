"""DeepSpeed settings against a plain PyTorch loop on one CUDA GPU (world size 1).

    python -m jobs.probe_deepspeed [--out DIR]

Each setting trains the ~1B Llama-shaped model of ``passn bench train`` (random weights, 8 x 1024
tokens a step, mean token cross-entropy, gradient clipping 1.0, fused AdamW, fp32 master weights)
in its own process, so that nothing one engine leaves on the GPU slows the next; the plain loop
runs first and last. Prints each setting's median seconds per step, the optimizer class DeepSpeed
built for it, and the ratio to the plain loop; writes ``probe.json`` and torch-profiler tables of
the profiled settings into ``--out``. It found why passn's stage-1 step was 0.94x of plain
PyTorch and what fixed it (README, "Training on one H200").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

STEPS, WARMUP, SEQUENCES, LENGTH, VOCAB = 25, 5, 8, 1024, 32000

# name -> how to train: "plain", or a DeepSpeed stage plus what is merged into its config
SETTINGS: list[tuple[str, dict]] = [
    ("plain PyTorch", {"kind": "plain", "profile": True}),
    ("stage 1, bf16 accumulation", {"kind": "ds", "stage": 1, "profile": True}),
    ("stage 1, bf16 accumulation, no overflow check", {"kind": "ds", "stage": 1, "bf16": {"check_grad_overflow": False}}),
    ("stage 1, fp32 accumulation", {"kind": "ds", "stage": 1, "profile": True,
                                    "extra": {"data_types": {"grad_accum_dtype": "fp32"}}}),
    ("stage 1, fp32 accumulation, immediate_grad_update", {"kind": "ds", "stage": 1, "bf16": {"immediate_grad_update": True},
                                                           "extra": {"data_types": {"grad_accum_dtype": "fp32"}}}),
    ("stage 1, fp32 accumulation, immediate, no overflow check",
     {"kind": "ds", "stage": 1, "bf16": {"immediate_grad_update": True, "check_grad_overflow": False},
      "extra": {"data_types": {"grad_accum_dtype": "fp32"}}}),
    ("stage 1, overlap_comm, contiguous, 5e8 buckets",
     {"kind": "ds", "stage": 1, "zero": {"overlap_comm": True, "contiguous_gradients": True,
                                         "reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8)}}),
    ("stage 1, no reduce_scatter, no contiguous", {"kind": "ds", "stage": 1,
                                                   "zero": {"reduce_scatter": False, "contiguous_gradients": False}}),
    ("stage 0, bf16", {"kind": "ds", "stage": 0}),
    ("plain PyTorch again", {"kind": "plain"}),
]


def _loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    from passn import objectives

    return -objectives.token_logprobs(logits_BTV, targets_BT).sum(-1).mean() / LENGTH


def _timed(step, profile: bool) -> tuple[float, str | None]:
    from jobs.bench_train import batches, time_steps

    data = batches(STEPS, SEQUENCES, LENGTH, VOCAB, "cuda")  # the same batches as passn bench train
    times = time_steps(step, data, WARMUP)
    table = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for batch in data[:3]:
                step(batch)
            torch.cuda.synchronize()
        table = p.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    return statistics.median(times), table


def _model():
    from transformers import LlamaForCausalLM

    from jobs.bench_train import llama_1b

    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(llama_1b())


def _plain(spec: dict) -> dict:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=batch["inputs_BT"]).logits
        _loss(logits, batch["targets_BT"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, table = _timed(step, spec.get("profile", False))
    return {"s": seconds, "table": table}


def _deepspeed(spec: dict) -> dict:
    import deepspeed

    from jobs.bench_train import init_single_rank_nccl

    init_single_rank_nccl()
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "steps_per_print": 1 << 30, "zero_optimization": {"stage": spec["stage"], **spec.get("zero", {})},
              "bf16": {"enabled": True, **spec.get("bf16", {})}, **spec.get("extra", {})}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def step(batch):
        engine.backward(_loss(engine(input_ids=batch["inputs_BT"]).logits, batch["targets_BT"]), scale_wrt_gas=False)
        engine.step()

    seconds, table = _timed(step, spec.get("profile", False))
    return {"s": seconds, "table": table, "optimizer": type(engine.optimizer).__name__, "config": config}


def _in_subprocess(spec: dict) -> dict:
    p = subprocess.run([sys.executable, "-m", "jobs.probe_deepspeed", "--child", json.dumps(spec)],
                       capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": f"exit {p.returncode}: " + (p.stdout[-1000:] + p.stderr[-3000:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.probe_deepspeed", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".", help="folder for probe.json and the profiler tables (default: .)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one setting, run by the parent
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(_plain(spec) if spec["kind"] == "plain" else _deepspeed(spec)), flush=True)
        return 0
    if not torch.cuda.is_available():
        print("python -m jobs.probe_deepspeed needs a CUDA GPU")
        return 2
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, dict] = {}
    for name, spec in SETTINGS:
        started = time.time()
        r = results[name] = _in_subprocess(spec)
        shown = f"{r['s']:.4f} s/step  {r.get('optimizer', '')}" if "s" in r else "ERROR " + r["error"][-1500:]
        print(f"{name:58} {shown} ({time.time() - started:.0f} s)", flush=True)
        with open(os.path.join(args.out, "probe.json"), "w") as f:
            json.dump(results, f, indent=1)
    plain = [r["s"] for name, r in results.items() if name.startswith("plain") and "s" in r]
    if plain:
        base = statistics.mean(plain)
        print(f"\nratio to plain PyTorch ({base:.4f} s/step, mean of its two runs):")
        for name, r in results.items():
            if "s" in r:
                print(f"  {name:58} {base / r['s']:.3f}x")
    for i, (name, r) in enumerate(results.items()):
        if r.get("table"):
            with open(os.path.join(args.out, f"profile_{i:02d}.txt"), "w") as f:
                f.write(f"{name}\n{r['table']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
