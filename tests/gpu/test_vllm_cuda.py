"""CUDA vLLM as passn's sampler: weights pushed in memory equal a fresh engine on them, `passn
serve` on a GPU replica answers the official client, `passn evaluate --checkpoint` samples on CUDA."""

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from passn.config import TinyModelSpec
from passn.models import build_tiny_model, write_model_folder

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).parents[2]
PROMPTS = ["abc=", "fedcba=", "bdf=", "acegik=", "cab=", "hgfe="]
TOKEN = "gpu-test-token-not-a-secret"


def _folder(root: Path, seed: int) -> tuple[str, torch.nn.Module]:
    model, tokenizer = build_tiny_model(TinyModelSpec(), seed=seed)
    model = model.to(torch.bfloat16)
    folder = str(root / f"m{seed}")
    write_model_folder(model, tokenizer, folder)
    return folder, model


def _free_gpu_bytes_settled() -> int:
    """The device's free memory once processes that were killed have let go of theirs."""
    last = -1
    for _ in range(30):
        free = torch.cuda.mem_get_info()[0]
        if free == last:
            return free
        last = free
        time.sleep(1)
    return last


def test_weights_pushed_in_memory_equal_a_fresh_engine_on_them(tmp_path):
    """An awake engine given weights in memory equals a fresh engine started on them (greedy
    tokens, log-probs, seeded samples); that fresh engine sleeps between draws (its KV cache given
    back to the GPU) and takes a push while asleep."""
    import ray

    from actors.sampler import SamplerPool
    from passn.weight_push import SharedWeights

    first, model0 = _folder(tmp_path, 0)
    second, model = _folder(tmp_path, 1)
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False)
    try:
        options = dict(num_actors=1, backend="vllm", max_model_len=64, dtype="bfloat16", gpus_per_actor=0.3,
                       start_timeout_s=600)
        pool = SamplerPool(first, kv_cache_bytes=256 << 20, **options)
        greedy0, _ = pool.generate(PROMPTS, 1, 0.0, 12)
        model, model0 = model.cuda(), model0.cuda()  # the driver is the "trainer": CUDA weights, shared by IPC
        shared = SharedWeights.of(model, torch.bfloat16)
        assert shared.cuda and len(shared.names) == len(list(model.parameters())) and len(shared.buckets) == 1
        started = time.perf_counter()
        pool.load_weights(shared, version=1)
        push_s = time.perf_counter() - started
        pushed, _ = pool.generate(PROMPTS, 1, 0.0, 12)
        sampled, _ = pool.generate(PROMPTS, 8, 1.0, 12, seed=5)
        # the first weights again, broadcast over a process group from CUDA buckets (gloo: the engine
        # shares this GPU, and NCCL puts one rank on a GPU; engines on other GPUs get NCCL)
        pool.load_weights(SharedWeights.of(model0, torch.bfloat16, by_group=True), version=2)
        assert pool.weight_group.backend == "gloo"
        by_group0, _ = pool.generate(PROMPTS, 1, 0.0, 12)
        pool.shutdown()
        kv = 4 << 30
        free_before = _free_gpu_bytes_settled()
        fresh_pool = SamplerPool(second, kv_cache_bytes=kv, sleep_when_idle=True, **options)
        held_asleep = free_before - torch.cuda.mem_get_info()[0]
        fresh, _ = fresh_pool.generate(PROMPTS, 1, 0.0, 12)
        fresh_sampled, _ = fresh_pool.generate(PROMPTS, 8, 1.0, 12, seed=5)
        held_after_draws = free_before - torch.cuda.mem_get_info()[0]
        fresh_pool.load_weights(SharedWeights.of(model0, torch.bfloat16), version=2)  # a push while asleep
        back0, _ = fresh_pool.generate(PROMPTS, 1, 0.0, 12)
        fresh_pool.shutdown()
    finally:
        ray.shutdown()
    print(f"push of {shared}: {push_s:.3f} s; a sleeping engine with a {kv >> 30} GiB KV cache holds "
          f"{held_asleep / 2**30:.2f} GiB, {held_after_draws / 2**30:.2f} GiB after two draws")
    assert [c.token_ids for c in pushed] == [c.token_ids for c in fresh]  # greedy tokens identical
    for a, b in zip(pushed, fresh):
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-3)
    assert [c.token_ids for c in sampled] == [c.token_ids for c in fresh_sampled]  # seeded samples too
    # asleep, the engine holds its CUDA context and graphs, not its KV cache (nor, level 1, its weights)
    assert held_asleep < kv - (2 << 30) and held_after_draws < kv - (2 << 30)
    assert [c.token_ids for c in back0] == [c.token_ids for c in greedy0]
    assert [c.token_ids for c in by_group0] == [c.token_ids for c in greedy0]
    for a, b in zip(by_group0, greedy0):
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-3)


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory, passn_serve):
    root = tmp_path_factory.mktemp("serve")
    folder, _ = _folder(root, 0)
    (root / "token").write_text(TOKEN + "\n")
    args = ["--checkpoint", f"base={folder}", "--token-file", str(root / "token"), "--gpus-per-replica", "0.5",
            "--max-ongoing", "8", "--max-queued", "8", "--max-n", "64", "--max-tokens", "32"]
    with passn_serve(args, root / "serve.log", 400, env={"PASSN_SERVE_TOKEN": ""}) as (_, url):
        yield {"url": url, "root": root, "folder": folder, "log": root / "serve.log"}


def test_serve_on_a_gpu_replica_answers_the_openai_client(gpu_server):
    import httpx
    import openai

    client = openai.OpenAI(base_url=gpu_server["url"] + "/v1", api_key=TOKEN, max_retries=0)
    out = client.completions.create(model="base", prompt="abc=", n=8, logprobs=1, max_tokens=6, temperature=1.0,
                                    seed=3)
    assert len(out.choices) == 8
    assert all(len(ch.logprobs.token_logprobs) >= 1 and all(v <= 0 for v in ch.logprobs.token_logprobs)
               for ch in out.choices)
    again = client.completions.create(model="base", prompt="abc=", n=8, logprobs=1, max_tokens=6, temperature=1.0,
                                      seed=3)
    assert [ch.text for ch in again.choices] == [ch.text for ch in out.choices]  # seeded repeats identical

    async def burst():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=250)) as http:
            body = {"model": "base", "prompt": "abcdefg=", "n": 16, "max_tokens": 16, "temperature": 1.0}
            return await asyncio.gather(*[
                http.post(gpu_server["url"] + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {TOKEN}"}) for _ in range(200)])

    started = time.perf_counter()
    codes = [r.status_code for r in asyncio.run(burst())]
    print(f"200-request burst in {time.perf_counter() - started:.1f} s:",
          {c: codes.count(c) for c in sorted(set(codes))})
    assert len(codes) == 200 and set(codes) <= {200, 429, 503}, sorted(set(codes))
    assert codes.count(200) >= 8


def test_evaluate_a_checkpoint_with_vllm_on_cuda(gpu_server, tmp_path):
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", "--checkpoint", gpu_server["folder"],
                           "--config", str(ROOT / "configs" / "tiny.yaml"), "--samples", "64", "--limit", "32",
                           "--gpus-per-sampler", "0.4", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 32 and "vllm SamplerPool x 1 (0.4 GPU each)" in json.dumps(summary)
    rows = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert all(r["samples"] == 64 for r in rows)
