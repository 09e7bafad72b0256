"""`passn bench train` (one CUDA GPU): passn's training path against a plain PyTorch loop.

Both train the same Llama-shaped model (random weights, ~1B parameters) on the same random
batches with the same numerics: fp32 master weights, bf16 compute, fused AdamW. passn's path is a
Ray Train worker running passn's DeepSpeed engine and objective (jobs/train.py); the baseline is a
single-process loop with ``torch.autocast(bfloat16)``. Printed side by side from one run:
seconds per step, tokens/s, MFU, the ratio to the baseline, dco against ce, ZeRO-2 and ZeRO-3.

With ``--gpus 1,2,4,8``: scaling across the GPUs of one host instead. passn's path alone at each
GPU count and ZeRO stage (``--zero``), at a fixed batch per GPU, on ``--model`` (1b, or 3b / 8b,
whose optimizer state needs ZeRO-3 to fit): seconds per step, tokens/s per GPU, MFU, and the
scaling efficiency against the smallest count that ran (per-GPU throughput at N over that at the
smallest; target >= 0.9 for ZeRO-2 from 1 to 8 GPUs), then dco against ce at the largest count. A
configuration that fails (one that does not fit) is printed as such and the others still run.
``--device cpu --model tiny`` runs the same path with CPU workers (gloo): a check of the code,
not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from jobs.bench_output import write_result

# dense bf16 peak of an H100/H200 SXM by the datasheet; MFU = 6 N tokens/s / peak
PEAK_BF16_FLOPS = 989.5e12


def llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int, max_positions: int):
    """A Llama-shaped config with the benchmark's fixed choices (32k vocabulary, untied head, fp32)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                       max_position_embeddings=max_positions, tie_word_embeddings=False, torch_dtype="float32")


def llama_1b():
    return llama(2048, 5632, 16, 16, 16, 128, 2048)


# --model: the shapes the benchmark trains (3b and 8b: optimizer state beyond one GPU without ZeRO-3)
MODELS = {"tiny": lambda: llama(64, 128, 2, 4, 4, 16, 2048), "1b": llama_1b,
          "3b": lambda: llama(3072, 8192, 28, 24, 8, 128, 4096), "8b": lambda: llama(4096, 14336, 32, 32, 8, 128, 4096)}


def parameter_count(config) -> int:
    """Parameters of the Llama ``config`` describes, counted without allocating them."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def batches(count: int, sequences: int, length: int, vocab: int, device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (sequences, length + 1), generator=g)
        out.append({"inputs_BT": ids[:, :-1].to(device), "targets_BT": ids[:, 1:].to(device),
                    "mask_BT": torch.ones(sequences, length, device=device),
                    "attention_BT": torch.ones(sequences, length, dtype=torch.long, device=device)})
    return out


def time_steps(step_fn, batches, warmup: int) -> list[float]:
    sync = torch.cuda.synchronize if batches and batches[0]["inputs_BT"].is_cuda else (lambda: None)
    times = []
    for i, batch in enumerate(batches):
        sync()
        start = time.perf_counter()
        step_fn(batch)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def bench_coefficients(objective: str, sequences: int):
    """What a CE or DCO (N' = 64) batch source gives the step: 1, or F(N', p) from the forward."""
    from passn.batches import Fixed, OwnCoverage

    return OwnCoverage(64) if objective == "dco" else Fixed((1.0,) * sequences)


def plain_pytorch(objective: str, steps: int, sequences: int, length: int, warmup: int) -> dict[str, Any]:
    """The baseline: one process, autocast bf16, fp32 master weights, fused AdamW."""
    times, params = _plain_steps(objective, steps, sequences, length, warmup)
    torch.cuda.empty_cache()  # the model and optimizer went with _plain_steps' frame
    return _summary("plain PyTorch", objective, None, times, params, sequences * length)


def _plain_steps(objective: str, steps: int, sequences: int, length: int, warmup: int) -> tuple[list[float], int]:
    from transformers import LlamaForCausalLM

    from passn import objectives
    from passn.batches import weighted_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_1b()).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=batch["inputs_BT"], attention_mask=batch["attention_BT"]).logits
        token_logp = objectives.token_logprobs(logits, batch["targets_BT"])
        loss_B, _ = weighted_loss(token_logp, batch["mask_BT"], bench_coefficients(objective, sequences), 0, "sequence_sum")
        (loss_B.sum() / len(loss_B)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = time_steps(step, batches(steps, sequences, length, 32000, "cuda"), warmup)
    return times, sum(p.numel() for p in model.parameters())


def _summary(path: str, objective: str, zero: int | None, times: list[float], params: int, tokens: int) -> dict[str, Any]:
    s = statistics.median(times)
    return {"path": path, "objective": objective, "zero_stage": zero, "s_per_step": s,
            "tokens_per_s": tokens / s, "mfu": 6 * params * tokens / s / PEAK_BF16_FLOPS, "params": params,
            "steps_timed": len(times)}


def _passn_worker(config: dict[str, Any]) -> None:
    import ray.train

    result = _deepspeed_steps(config, ray.train.torch.get_device(), "passn (Ray Train + DeepSpeed)")
    if ray.train.get_context().get_world_rank() == 0:  # every rank steps in lockstep: rank 0's times stand
        with open(config["out"], "w") as f:
            json.dump(result, f)


def init_single_rank_nccl() -> None:
    """A one-rank NCCL process group in this process on cuda:0 (DeepSpeed wants one even alone)."""
    import os
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", device_id=torch.device("cuda:0"))


def raw_deepspeed(objective: str, zero: int, steps: int, sequences: int, length: int, warmup: int,
                  params: int) -> dict[str, Any]:
    """The same engine and step in this process, without Ray: separates Ray's cost from DeepSpeed's."""
    import torch.distributed as dist

    init_single_rank_nccl()
    try:
        config = {"objective": objective, "zero": zero, "steps": steps, "sequences": sequences, "length": length,
                  "warmup": warmup, "params": params, "precision": "deepspeed_bf16"}
        return _deepspeed_steps(config, torch.device("cuda:0"), "DeepSpeed alone (no Ray)")
    finally:
        dist.destroy_process_group()
        torch.cuda.empty_cache()


def _deepspeed_steps(config: dict[str, Any], device, label: str) -> dict[str, Any]:
    """``config["objective"]`` "alternate" runs dco and ce steps in turn on one engine and reports
    their step times separately: the dco/ce difference without run-to-run noise."""
    from transformers import LlamaForCausalLM

    from passn.batches import weighted_loss
    from passn.config import load_config
    from trainer.engines import DeepSpeedEngine
    from trainer.loop import token_logp

    kinds = ["dco", "ce"] if config["objective"] == "alternate" else [config["objective"]]
    cfgs = {kind: load_config(None, [f"objective.kind={kind}", *(["objective.budget=64"] if kind == "dco" else []),
                                     "model.path=unused",
                                     "model.dtype=bfloat16", f"resources.zero_stage={config['zero']}",
                                     f"optim.sequences_per_step={config['sequences']}",
                                     f"optim.micro_sequences_per_worker={config['sequences']}", "optim.warmup_steps=0",
                                     "optim.learning_rate=1e-5", f"resources.mixed_precision={config['precision']}"])
            for kind in kinds}
    torch.manual_seed(0)
    model = LlamaForCausalLM(MODELS[config.get("model", "1b")]())
    engine = DeepSpeedEngine(model, cfgs[kinds[0]], micro_batches=1, device=device)
    sequences = config["sequences"]
    order: list[str] = []

    def step(batch):
        kind = kinds[len(order) % len(kinds)]
        order.append(kind)
        loss_B, _ = weighted_loss(token_logp(engine, batch), batch["mask_BT"], bench_coefficients(kind, sequences), 0,
                                  "sequence_sum")
        engine.backward_and_step(loss_B.sum() / sequences)

    times = time_steps(step, batches(config["steps"], sequences, config["length"], 32000, device), config["warmup"])
    kinds_timed = order[config["warmup"]:]
    params = sum(p.numel() for p in engine.module.parameters()) if config["zero"] != 3 else config["params"]
    if config["precision"] == "torch_autocast":
        label += ", autocast"
    per_kind = {k: [t for t, o in zip(times, kinds_timed) if o == k] for k in kinds}
    if engine.zero_stage != config["zero"]:
        label += f", runs stage {engine.zero_stage}"
    result = _summary(label, kinds[0], config["zero"], per_kind[kinds[0]], params, sequences * config["length"])
    if len(kinds) == 2:
        result["path"] += ", dco/ce alternating"
        result["dco_over_ce_alternating"] = statistics.median(per_kind["dco"]) / statistics.median(per_kind["ce"])
    return result  # the engine and its model go with this frame


def passn_path(objective: str, zero: int, steps: int, sequences: int, length: int, warmup: int, params: int,
               precision: str = "deepspeed_bf16", num_workers: int = 1, model: str = "1b",
               use_gpu: bool = True) -> dict[str, Any]:
    """passn's training path: ``num_workers`` Ray Train workers (one GPU each, NCCL; or CPU
    processes with gloo), each stepping ``sequences`` x ``length`` tokens; rank 0's step times."""
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = tempfile.mktemp(suffix=".json")
    TorchTrainer(
        _passn_worker,
        train_loop_config={"objective": objective, "zero": zero, "steps": steps, "sequences": sequences,
                           "length": length, "warmup": warmup, "out": out, "params": params, "precision": precision,
                           "model": model},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=RunConfig(storage_path=tempfile.mkdtemp()),
    ).fit()
    with open(out) as f:
        return json.load(f)


def scaling_efficiency(rows: list[dict[str, Any]]) -> None:
    """Add to each row that ran its per-GPU throughput over that of the smallest GPU count that ran
    at the same ZeRO stage (the batch per GPU is fixed, so 1.0 is perfect scaling)."""
    for zero in {r["zero_stage"] for r in rows}:
        ran = sorted((r for r in rows if r["zero_stage"] == zero and "error" not in r), key=lambda r: r["gpus"])
        for r in ran:
            r["scaling_base_gpus"] = ran[0]["gpus"]
            r["scaling_efficiency"] = r["tokens_per_s"] / ran[0]["tokens_per_s"]


def run_scaling(args: argparse.Namespace) -> int:
    """``--gpus``: passn's path at each GPU count and ZeRO stage; see the module's docstring."""
    import os

    from jobs.cluster import ray_session

    use_gpu = args.device == "cuda"
    counts = sorted({int(n) for n in args.gpus.split(",")})
    have = torch.cuda.device_count() if use_gpu else (os.cpu_count() or 1)
    if use_gpu and not have:
        print("passn bench train --device cuda needs CUDA GPUs (--device cpu checks the code path on CPU workers)")
        return 2
    if counts[-1] > have:
        print(f"--gpus asks for {counts[-1]} {'GPUs' if use_gpu else 'CPU workers'}; this host has {have}")
        return 2
    params = parameter_count(MODELS[args.model]())
    kw = {"steps": args.steps, "sequences": args.sequences, "length": args.length, "warmup": args.warmup,
          "params": params, "model": args.model, "use_gpu": use_gpu}
    rows: list[dict[str, Any]] = []
    with ray_session(num_cpus=os.cpu_count(), **({"num_gpus": have} if use_gpu else {})):
        for zero in [int(z) for z in args.zero.split(",")]:
            for n in counts:
                try:
                    row = passn_path("dco", zero, num_workers=n, **kw)
                except Exception as e:  # e.g. out of memory: the other configurations still run
                    row = {"objective": "dco", "zero_stage": zero, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                row["gpus"] = n
                rows.append(row)
                print(f"{n} {'GPU' if use_gpu else 'CPU worker'}(s), ZeRO-{zero}: "
                      + (f"{row['s_per_step']:.4f} s/step" if "error" not in row else f"failed: {row['error']}"),
                      flush=True)
        dco_vs_ce = None
        ran = [r for r in rows if r["gpus"] == counts[-1] and r["zero_stage"] == 2 and "error" not in r]
        if ran and args.ce:
            ce = passn_path("ce", 2, num_workers=counts[-1], **kw)
            dco_vs_ce = ran[0]["s_per_step"] / ce["s_per_step"]
    scaling_efficiency(rows)
    device = torch.cuda.get_device_name() if use_gpu else "CPU (gloo): a check of the code path, not a measurement"
    print(f"\n{device} | {args.model}: {params / 1e9:.2f}B parameters | {args.sequences} x {args.length} tokens a "
          f"step per {'GPU' if use_gpu else 'worker'}")
    print(f"{'GPUs':>4} {'ZeRO':>4} {'s/step':>8} {'tokens/s/GPU':>12} {'MFU':>6} {'efficiency':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['gpus']:>4} {r['zero_stage']:>4}   failed: {r['error'][:100]}")
            continue
        mfu = f"{r['mfu']:6.1%}" if use_gpu else f"{'-':>6}"
        print(f"{r['gpus']:>4} {r['zero_stage']:>4} {r['s_per_step']:8.4f} {r['tokens_per_s']:12,.0f} {mfu} "
              f"{r['scaling_efficiency']:9.2f}x  (against {r['scaling_base_gpus']})")
    z2 = [r for r in rows if r["zero_stage"] == 2 and "error" not in r]
    if len(z2) > 1:
        last = z2[-1]["scaling_efficiency"]
        print(f"ZeRO-2 scaling efficiency from {z2[0]['gpus']} to {z2[-1]['gpus']}: {last:.2f} (target >= 0.9: "
              f"{'met' if last >= 0.9 else 'MISSED'})")
    if dco_vs_ce is not None:
        print(f"dco/ce step time at {counts[-1]}, ZeRO-2: {dco_vs_ce:.3f} (target <= 1.02)")
    write_result(args.out, {"rows": rows, "dco_over_ce": dco_vs_ce, "device": device, "model": args.model,
                            "params": params, "sequences_per_gpu": args.sequences, "length": args.length})
    return 0


def run(args: argparse.Namespace) -> int:
    import os

    from jobs.cluster import ray_session

    if args.gpus:
        return run_scaling(args)
    if args.device != "cuda" or args.model != "1b":
        print("--device and --model apply to the scaling runs (--gpus)")
        return 2
    if not torch.cuda.is_available():
        print("passn bench train needs a CUDA GPU (it compares GPU training paths)")
        return 2
    kw = {"steps": args.steps, "sequences": args.sequences, "length": args.length, "warmup": args.warmup}
    rows = [plain_pytorch("dco", **kw), plain_pytorch("ce", **kw)]
    params = rows[0]["params"]
    rows.append(raw_deepspeed("dco", 2, params=params, **kw))
    with ray_session(num_cpus=os.cpu_count(), num_gpus=1):
        for objective, zero, precision in [("dco", 2, "deepspeed_bf16"), ("ce", 2, "deepspeed_bf16"),
                                           ("alternate", 2, "deepspeed_bf16"), ("dco", 1, "deepspeed_bf16"),
                                           ("dco", 0, "deepspeed_bf16"), ("dco", 2, "torch_autocast"),
                                           ("dco", 3, "deepspeed_bf16")][: args.rows]:
            rows.append(passn_path(objective, zero, params=params, precision=precision, **kw))
            print(f"passn {objective} ZeRO-{zero} {precision}: {rows[-1]['s_per_step']:.4f} s/step", flush=True)
        # back-to-back pairs: the ratio of neighbours cancels the drift between runs (clocks, heat)
        pairs = []
        for _ in range(args.pairs):
            pairs.append(plain_pytorch("dco", **kw)["s_per_step"] / passn_path("dco", 2, params=params, **kw)["s_per_step"])
            print(f"pair {len(pairs)}: passn ZeRO-2 / plain = {pairs[-1]:.3f}x", flush=True)
    base = {r["objective"]: r["s_per_step"] for r in rows if r["path"] == "plain PyTorch"}
    print(f"\n{torch.cuda.get_device_name()} | {params / 1e9:.2f}B parameters | {args.sequences} x {args.length} tokens a step")
    print(f"{'path':58} {'objective':9} {'ZeRO':4} {'s/step':>7} {'tokens/s':>9} {'MFU':>6} {'vs plain':>8}")
    for r in rows:
        ratio = base[r["objective"]] / r["s_per_step"]
        print(f"{r['path']:58} {r['objective']:9} {str(r['zero_stage'] if r['zero_stage'] is not None else '-'):4} {r['s_per_step']:7.4f} "
              f"{r['tokens_per_s']:9,.0f} {r['mfu']:6.1%} {ratio:7.2f}x")
    def passn_row(objective: str) -> float:  # the plain ZeRO-2 rows (not alternating, not autocast)
        return next(r["s_per_step"] for r in rows if r["path"].startswith("passn") and r["objective"] == objective
                    and r["zero_stage"] == 2 and "alternating" not in r["path"] and "autocast" not in r["path"])

    dco_vs_ce = None
    if args.rows >= 2:  # the first two rows are ZeRO-2 dco and ce
        dco_vs_ce = passn_row("dco") / passn_row("ce")
        print(f"passn ZeRO-2 dco/ce step time: {dco_vs_ce:.3f} (target <= 1.02)")
    if pairs:
        print(f"passn ZeRO-2 dco / plain, {len(pairs)} back-to-back pairs: "
              f"{', '.join(f'{p:.3f}x' for p in pairs)}; median {statistics.median(pairs):.3f}x (target >= 0.95x)")
    alternating = [r["dco_over_ce_alternating"] for r in rows if "dco_over_ce_alternating" in r]
    if alternating:
        print(f"passn ZeRO-2 dco/ce, alternating steps on one engine: {alternating[0]:.3f} (target <= 1.02)")
    write_result(args.out, {"rows": rows, "dco_over_ce": dco_vs_ce, "dco_over_ce_alternating": alternating,
                            "pairs_passn_over_plain": pairs, "device": torch.cuda.get_device_name()})
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("train", help="GPU: passn's DeepSpeed path vs plain PyTorch (tokens/s, MFU); "
                                       "--gpus: scaling across the GPUs of one host",
                         description=__doc__.split("\n\n")[1], epilog=__doc__.split("\n\n", 2)[2],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=45)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--rows", type=int, default=7, help="passn configurations to run (the first ROWS of the list)")
    p.add_argument("--pairs", type=int, default=0,
                   help="then this many back-to-back (plain, passn ZeRO-2) dco pairs, each pair's ratio printed")
    p.add_argument("--gpus", help="scaling runs instead, at these GPU counts of this host, e.g. 1,2,4,8")
    p.add_argument("--zero", default="2,3", help="with --gpus: the ZeRO stages to run (default 2,3)")
    p.add_argument("--model", choices=sorted(MODELS), default="1b",
                   help="with --gpus: the Llama shape (3b, 8b: optimizer state beyond one GPU without ZeRO-3)")
    p.add_argument("--no-ce", dest="ce", action="store_false", help="with --gpus: skip the ce run at the largest count")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="with --gpus: cpu runs CPU workers over gloo (checks the code path; no figures)")
    p.add_argument("--out", help="also write the figures as JSON here")
    p.set_defaults(run=run)
